#!/usr/bin/env python3
"""Which top-level module of src/ imports which, and whether any of them form a cycle.

    python3 docs/module-graph.py          # edges, then the cycles (none expected)
    python3 docs/module-graph.py --dot    # Graphviz, for `dot -Tsvg`

An edge is a `crate::<module>` path (or a name the crate root re-exports from a module)
anywhere in a module's files outside comments. Exits 1 when there is a cycle, so a check can
run it.
"""
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def modules():
    """Top-level module name -> its .rs files."""
    out = defaultdict(list)
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            out[entry[:-3]].append(path)
        elif os.path.isdir(path):
            for d, _, files in os.walk(path):
                out[entry] += [os.path.join(d, f) for f in files if f.endswith(".rs")]
    return out


def root_reexports(names):
    """Names the crate root re-exports, and the module each comes from."""
    text = open(os.path.join(ROOT, "lib.rs")).read()
    out = {}
    for m in re.finditer(r"pub use (\w+)::(\{[^}]*\}|\w+);", text):
        if m.group(1) in names:
            for n in re.findall(r"\b(\w+)\b", m.group(2)):
                out[n] = m.group(1)
    return out


def edges():
    mods = modules()
    names = set(mods)
    reexp = root_reexports(names)
    out = defaultdict(set)
    for src, files in mods.items():
        for f in files:
            text = "\n".join(l for l in open(f).read().split("\n")
                             if not l.strip().startswith("//"))
            for m in re.finditer(r"crate::(\{[^}]*\}|\w+)", text):
                g = m.group(1)
                for n in (re.findall(r"\b(\w+)\b", g) if g.startswith("{") else [g]):
                    target = n if n in names else reexp.get(n)
                    if target and target != src:
                        out[src].add(target)
    return names, out


def cycles(names, out):
    """Strongly connected sets of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in out.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(names):
        if v not in index:
            visit(v)
    return found


def main():
    names, out = edges()
    found = cycles(names, out)
    if "--dot" in sys.argv:
        print("digraph halfguard {\n  rankdir=TB; node [shape=box];")
        for k in sorted(out):
            for t in sorted(out[k]):
                print(f'  "{k}" -> "{t}";')
        print("}")
    else:
        for k in sorted(names):
            print(f"{k:15} -> {', '.join(sorted(out.get(k, ()))) or '(nothing)'}")
        print("cycles:", found or "none")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
