//! The layers point one way: no top-level module of `src/` imports one that imports it back
//! (docs/ARCHITECTURE.md shows the graph; docs/module-graph.py draws it).

use crate::require;
use crate::support::Need;

#[test]
fn the_module_graph_has_no_cycle() {
    require!("the graph is read by a Python script"; Need::Tool("python3"));
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/docs/module-graph.py"))
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a cycle among the modules:\n{text}");
    // `server` is the top of the house: only main.rs may import it.
    for line in text.lines().filter(|l| !l.starts_with("server ")) {
        assert!(
            !line.split("->").nth(1).unwrap_or("").contains("server"),
            "a lower module imports the server: {line}"
        );
    }
}
