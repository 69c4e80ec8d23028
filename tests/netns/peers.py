#!/usr/bin/env python3
"""Small socket programs that tests/netns/run.py starts inside the test namespaces.

    peers.py backend --ports 17081,17082 --max-time S
    peers.py client  --src IP --dst IP:PORT --mode MODE [--max-time S] ...
    peers.py bench   --src IP --dst IP:PORT --count N --workers W --size BYTES ...
    peers.py probe   --src IP --dst IP:PORT --duration S --interval S ...
    peers.py flood   --dst IP --dport PORT --net 198.18.128.0/17 --addrs N --duration S

Stdlib only. Every program is bounded in time (--max-time / --duration) so nothing outlives
the suite even if the runner is killed; every loop is bounded in count or time.

Clients and the flood print one JSON object per line on stdout (events and summaries) and
read commands, one per line, on stdin. The backend prints "READY" once it listens.

Backend protocol: the client sends one command line, then:
  ECHO        -> "HELLO <local ip:port>\\n", then echo until EOF; FIN after EOF.
  STREAM      -> "HELLO ...\\n", then 16 KiB chunks until the peer fails (or the bound).
  REQ n [ms]  -> n bytes, an optional pause, FIN; then read until the client's EOF, close.
  REQKEEP n   -> n bytes; then read until the client's EOF, then FIN and close.
  UPLOAD ms   -> read in silence until EOF, wait ms, answer "got N\\n", FIN.
  HOLD        -> read and discard until EOF; then hold the socket open (no FIN) until an
                 error or the bound.
"""

import argparse
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time

mono = time.monotonic


def emit(**kw):
    kw.setdefault("t", mono())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# backend


def recv_line(s, limit=256):
    buf = b""
    while b"\n" not in buf and len(buf) < limit:
        chunk = s.recv(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line.decode("ascii", "replace").strip(), rest


def serve_one(s, deadline):
    s.settimeout(30)
    try:
        cmd, rest = recv_line(s)
        parts = cmd.split()
        if not parts:
            return
        verb = parts[0]
        here = "%s:%d" % s.getsockname()[:2]
        if verb == "ECHO":
            s.sendall(("HELLO %s\n" % here).encode())
            if rest:
                s.sendall(rest)
            while mono() < deadline:
                d = s.recv(65536)
                if not d:
                    s.shutdown(socket.SHUT_WR)
                    break
                s.sendall(d)
        elif verb == "STREAM":
            s.sendall(("HELLO %s\n" % here).encode())
            chunk = b"s" * 16384
            end = min(deadline, mono() + 120)
            while mono() < end:
                s.sendall(chunk)
        elif verb in ("REQ", "REQKEEP"):
            n = int(parts[1]) if len(parts) > 1 else 100
            s.sendall(b"r" * n)
            if verb == "REQ":
                # An optional pause (ms), so that the FIN travels alone and not on the
                # last data segment.
                if len(parts) > 2:
                    time.sleep(int(parts[2]) / 1000)
                s.shutdown(socket.SHUT_WR)
            end = min(deadline, mono() + 60)
            while mono() < end:
                if not s.recv(65536):
                    break
        elif verb == "UPLOAD":
            # Take an upload in silence until EOF, "compute" for ms, answer, FIN.
            ms = int(parts[1]) if len(parts) > 1 else 0
            n = len(rest)
            end = min(deadline, mono() + 60)
            while mono() < end:
                d = s.recv(65536)
                if not d:
                    break
                n += len(d)
            time.sleep(ms / 1000)
            s.sendall(("got %d\n" % n).encode())
            s.shutdown(socket.SHUT_WR)
        elif verb == "HOLD":
            end = min(deadline, mono() + 60)
            while mono() < end:
                if not s.recv(65536):
                    break
            # Half-closed by the peer: keep our side open and silent (no FIN) until an RST
            # (SO_ERROR) or the bound. (After EOF the socket is always readable, so poll
            # the error instead of select.)
            while mono() < end:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    break
                time.sleep(0.5)
    except (OSError, ValueError):
        pass
    finally:
        try:
            s.close()
        except OSError:
            pass


def backend(args):
    deadline = mono() + args.max_time
    lsocks = []
    for p in args.ports.split(","):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", int(p)))
        ls.listen(1024)
        lsocks.append(ls)
    print("READY", flush=True)
    active = [0]
    lock = threading.Lock()

    def run(s):
        try:
            serve_one(s, deadline)
        finally:
            with lock:
                active[0] -= 1

    while mono() < deadline:
        r, _, _ = select.select(lsocks, [], [], 0.5)
        for ls in r:
            try:
                s, _ = ls.accept()
            except OSError:
                continue
            with lock:
                if active[0] >= 600:  # bounded thread count
                    s.close()
                    continue
                active[0] += 1
            threading.Thread(target=run, args=(s,), daemon=True).start()


# ---------------------------------------------------------------------------------------
# one long-lived client connection, driven by stdin commands


def parse_hp(hp):
    h, _, p = hp.rpartition(":")
    return h, int(p)


class Stdin:
    """Commands from the runner, one per line, read by a thread."""

    def __init__(self):
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            with self.cv:
                self.lines.append(line.strip())
                self.cv.notify_all()

    def wait(self, word, timeout):
        end = mono() + timeout
        with self.cv:
            while word not in self.lines:
                left = end - mono()
                if left <= 0:
                    return False
                self.cv.wait(left)
            self.lines.remove(word)
            return True

    def has(self, word):
        with self.cv:
            if word in self.lines:
                self.lines.remove(word)
                return True
            return False


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += d
    return buf


def wait_end(s, deadline):
    """Blocks reading until EOF, an error (RST, timeout) or the deadline; reports which."""
    while True:
        left = deadline - mono()
        if left <= 0:
            emit(ev="end", how="deadline")
            return
        s.settimeout(min(left, 1.0))
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        except OSError as e:
            emit(ev="end", how="error", error=e.__class__.__name__ + ": " + str(e))
            return
        if not d:
            emit(ev="end", how="eof")
            return


def client(args):
    deadline = mono() + args.max_time
    cmds = Stdin()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((args.src, 0))
    s.settimeout(5)
    s.connect(parse_hp(args.dst))
    lport = s.getsockname()[1]
    mode = args.mode
    if mode == "stream":
        s.sendall(b"STREAM\n")
        got = 0
        emit(ev="open", lport=lport)
        s.settimeout(1.0)
        while mono() < deadline:
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                emit(ev="end", how="error", error=str(e), got=got)
                return
            if not d:
                emit(ev="end", how="eof", got=got)
                return
            got += len(d)
            if args.read_pause:
                time.sleep(args.read_pause)
        emit(ev="end", how="deadline", got=got)
    elif mode == "idle":
        # One exchange, then silence; the runner may freeze this process (SIGSTOP).
        s.sendall(b"REQKEEP 100\n")
        recv_exact(s, 100)
        emit(ev="open", lport=lport)
        wait_end(s, deadline)
    elif mode == "finlost":
        s.sendall(b"REQKEEP 100\n")
        recv_exact(s, 100)
        emit(ev="open", lport=lport)
        if not cmds.wait("close", args.max_time):
            return
        s.close()  # FIN (which the path will drop); the kernel keeps retrying it
        emit(ev="closed")
        while mono() < deadline and not cmds.has("exit"):
            time.sleep(0.2)
    elif mode == "serverfin":
        emit(ev="connected", lport=lport)
        if not cmds.wait("go", args.max_time):
            return
        s.sendall(b"REQ 100 200\n")
        try:
            recv_exact(s, 100)
            emit(ev="open", lport=lport)
        except (OSError, EOFError) as e:
            emit(ev="end", how="error", error=str(e))
            return
        wait_end(s, deadline)  # the server's FIN never arrives
    elif mode == "halfclose":
        s.sendall(b"HOLD\n" + b"h" * 100)
        emit(ev="open", lport=lport)
        if not cmds.wait("go", args.max_time):
            return
        s.shutdown(socket.SHUT_WR)
        emit(ev="fin")
        wait_end(s, deadline)
    elif mode == "upload":
        # Upload for --upload-s seconds while the server says nothing, half-close, then
        # wait for the server's answer.
        s.sendall(("UPLOAD %d\n" % args.answer_ms).encode())
        emit(ev="open", lport=lport)
        end = mono() + args.upload_s
        sent = 0
        while mono() < end:
            s.sendall(b"u" * 1000)
            sent += 1000
            time.sleep(0.05)
        s.shutdown(socket.SHUT_WR)
        emit(ev="fin", sent=sent)
        s.settimeout(10)
        try:
            reply = s.recv(100)
            emit(ev="end", how="reply" if reply else "eof",
                 reply=reply.decode(errors="replace").strip())
        except OSError as e:
            emit(ev="end", how="error", error=e.__class__.__name__ + ": " + str(e))
    elif mode == "echo":
        s.sendall(b"ECHO\n")
        hello, rest = recv_line(s)
        emit(ev="open", lport=lport, backend=hello.split()[-1] if hello else "")
        n = 0
        payload = b"e" * 100
        pending = len(rest)
        while mono() < deadline:
            if cmds.has("stop"):
                emit(ev="summary", alive=True, echoes=n)
                return
            try:
                s.sendall(payload)
                s.settimeout(4.0)
                need = 100 - pending
                while need > 0:
                    d = s.recv(need)
                    if not d:
                        raise EOFError("eof")
                    need -= len(d)
                pending = 0
                n += 1
            except (OSError, EOFError) as e:
                emit(ev="end", how="error", error=str(e), echoes=n)
                emit(ev="summary", alive=False, echoes=n)
                return
            time.sleep(0.1)
        emit(ev="summary", alive=True, echoes=n)
    else:
        raise SystemExit("unknown mode " + mode)


# ---------------------------------------------------------------------------------------
# many short transactions: bench (concurrent, fixed count) and probe (paced, fixed time)


def transaction(src, dst, size, connect_timeout, total_timeout):
    """connect, REQ size, read size bytes and the server's FIN, close.
    Returns (ok, connect_s, total_s, why)."""
    t0 = mono()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((src, 0))
        s.settimeout(connect_timeout)
        try:
            s.connect(dst)
        except OSError as e:
            return False, None, mono() - t0, "connect: " + e.__class__.__name__
        tc = mono() - t0
        end = t0 + total_timeout
        s.sendall(("REQ %d\n" % size).encode())
        got = 0
        while True:
            left = end - mono()
            if left <= 0:
                return False, tc, mono() - t0, "timeout after %d bytes" % got
            s.settimeout(left)
            try:
                d = s.recv(65536)
            except OSError as e:
                return False, tc, mono() - t0, "%s after %d bytes" % (e.__class__.__name__, got)
            if not d:
                break
            got += len(d)
        if got != size:
            return False, tc, mono() - t0, "short: %d of %d" % (got, size)
        return True, tc, mono() - t0, ""
    finally:
        s.close()


def bench(args):
    dst = parse_hp(args.dst)
    end = mono() + args.max_time
    lock = threading.Lock()
    todo = [args.count]
    results = []

    def worker():
        while True:
            with lock:
                if todo[0] <= 0 or mono() > end:
                    return
                todo[0] -= 1
            r = transaction(args.src, dst, args.size, args.connect_timeout, args.timeout)
            with lock:
                results.append(r)

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.1, end - mono() + args.timeout + 1))
    summarize(results, args.count)


def probe(args):
    dst = parse_hp(args.dst)
    results = []
    start = mono()
    k = 0
    while k < args.count and mono() - start < args.duration:
        due = start + k * args.interval
        if due > mono():
            time.sleep(due - mono())
        results.append(
            transaction(args.src, dst, args.size, args.connect_timeout, args.timeout))
        k += 1
    summarize(results, len(results))


def summarize(results, planned):
    ok = [r for r in results if r[0]]
    conn = sorted(r[1] for r in results if r[1] is not None)
    tot = sorted(r[2] for r in ok)
    why = {}
    for r in results:
        if not r[0]:
            why[r[3].split(" after")[0]] = why.get(r[3].split(" after")[0], 0) + 1

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))] if v else None

    emit(ev="summary", planned=planned, done=len(results), ok=len(ok),
         connected=len(conn),
         connect_p50=pct(conn, 0.5), connect_p95=pct(conn, 0.95),
         connect_max=conn[-1] if conn else None,
         total_p50=pct(tot, 0.5), total_p95=pct(tot, 0.95),
         total_max=tot[-1] if tot else None, failures=why)


# ---------------------------------------------------------------------------------------
# SYN flood from spoofed sources, raw socket, range-limited


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return (~s) & 0xFFFF


def syn_packet(src, dst, sport, dport, seq):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = struct.pack("!4s4sBBH", src, dst, 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    # IP header: the kernel fills in the total length, id (when 0) and the checksum.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64,
                     socket.IPPROTO_TCP, 0, src, dst)
    return ip + tcp


def flood(args):
    net = ipaddress.ip_network(args.net)
    hosts = list(net.hosts())
    rnd = random.Random(7)
    srcs = [hosts[rnd.randrange(len(hosts))] for _ in range(args.addrs)]
    for a in srcs:
        assert a in net  # never anything outside the given range
    dst = socket.inet_aton(args.dst)
    # A pool of distinct (source, port) SYNs, cycled: each distinct pair is a new request.
    pkts = []
    for i in range(args.pool):
        a = srcs[i % len(srcs)]
        pkts.append(syn_packet(a.packed, dst, 1024 + rnd.randrange(60000), args.dport,
                               rnd.getrandbits(32)))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    target = (args.dst, 0)
    emit(ev="start", addrs=len(srcs), pool=len(pkts))
    start = mono()
    end = start + args.duration
    sent = errors = 0
    n = len(pkts)
    batch = max(1, args.pps // 100)  # pace in 10 ms batches
    k = 0
    while True:
        now = mono()
        if now >= end:
            break
        due = start + k * 0.01
        if due > now:
            time.sleep(due - now)
        k += 1
        for _ in range(batch):
            try:
                s.sendto(pkts[sent % n], target)
                sent += 1
            except OSError:
                errors += 1
                sent += 1
    el = mono() - start
    emit(ev="summary", sent=sent, errors=errors, seconds=round(el, 2),
         pps=round(sent / el) if el else 0)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--ports", required=True)
    b.add_argument("--max-time", type=float, default=600)
    c = sub.add_parser("client")
    c.add_argument("--src", required=True)
    c.add_argument("--dst", required=True)
    c.add_argument("--mode", required=True)
    c.add_argument("--max-time", type=float, default=60)
    c.add_argument("--read-pause", type=float, default=0.0)
    c.add_argument("--upload-s", type=float, default=3.0)
    c.add_argument("--answer-ms", type=int, default=1500)
    for name in ("bench", "probe"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument("--size", type=int, default=100)
        p.add_argument("--connect-timeout", type=float, default=3.0)
        p.add_argument("--timeout", type=float, default=5.0)
        if name == "bench":
            p.add_argument("--count", type=int, required=True)
            p.add_argument("--workers", type=int, default=4)
            p.add_argument("--max-time", type=float, default=60)
        else:
            p.add_argument("--duration", type=float, required=True)
            p.add_argument("--count", type=int, default=10000)
            p.add_argument("--interval", type=float, default=0.1)
    f = sub.add_parser("flood")
    f.add_argument("--dst", required=True)
    f.add_argument("--dport", type=int, required=True)
    f.add_argument("--net", required=True)
    f.add_argument("--addrs", type=int, default=512)
    f.add_argument("--pool", type=int, default=32768)
    f.add_argument("--duration", type=float, default=10)
    f.add_argument("--pps", type=int, default=20000)
    args = ap.parse_args()
    if args.cmd == "flood" and args.duration > 10:
        raise SystemExit("flood: bounded to 10 s")
    {"backend": backend, "client": client, "bench": bench, "probe": probe,
     "flood": flood}[args.cmd](args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        os._exit(1)
