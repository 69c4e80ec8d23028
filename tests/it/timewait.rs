//! Where TIME_WAIT lands on clean closes, and the shipped remedy for the ports it holds.
//!
//! A client that closes first makes halfguard close first toward the backend: halfguard's
//! backend socket, not the backend's, keeps TIME_WAIT, and its ephemeral port stays taken
//! for that backend address for 60 s. Toward a non-loopback backend the ports run out
//! (about 470 client-first closes per second with the default range) unless TIME_WAIT ports
//! may be reused: `deploy/sysctl/90-halfguard.conf` sets `net.ipv4.tcp_tw_reuse = 1`.
//!
//! Runs in a network namespace of its own (root, iproute2, python3) with the backend on a
//! veth address from 198.18.0.0/15 and a port range narrowed to 20 ports, so running out
//! takes 20 closes instead of 28232. Skips, saying so, without root.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_halfguard");

struct Ns {
    name: String,
    children: Vec<Child>,
}

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Ns {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn time_wait(&self, filter: &str) -> usize {
        self.run(&["ss", "-Htan", "state", "time-wait", filter])
            .lines()
            .count()
    }
}

/// A key's value in the shipped sysctl file, if it sets it.
fn shipped_sysctl(key: &str) -> Option<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sysctl/90-halfguard.conf"
    );
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let l = l.split('#').next()?.trim().trim_start_matches('-');
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

const BACKEND: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.0.1", 18081)); s.listen(128)
def h(c):
    try:
        while c.recv(4096):
            pass
        c.sendall(b"ok")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=h, args=(c,), daemon=True).start()
"#;

/// `n` client-first closes through halfguard, `gap` apart: "ok failed".
const CLIENT: &str = r#"
import socket, sys, time
n, gap = int(sys.argv[1]), float(sys.argv[2])
ok = bad = 0
for i in range(n):
    c = socket.socket(); c.settimeout(2)
    try:
        c.connect(("127.0.0.1", 18080)); c.sendall(b"x"); c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(16)
            if not d:
                break
            got += d
        ok += got == b"ok"; bad += got != b"ok"
    except OSError:
        bad += 1
    finally:
        c.close()
    time.sleep(gap)
print(ok, bad)
"#;

#[test]
fn client_first_closes_keep_flowing_with_the_shipped_sysctls() {
    if Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout != b"0\n")
        .unwrap_or(true)
    {
        eprintln!("SKIP client_first_closes_keep_flowing_with_the_shipped_sysctls: needs root");
        return;
    }
    let mut ns = Ns {
        name: format!("hgtw{}", std::process::id()),
        children: Vec::new(),
    };
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .unwrap()
            .success()
    );
    ns.run(&["ip", "link", "set", "lo", "up"]);
    ns.run(&[
        "ip", "link", "add", "tw0", "type", "veth", "peer", "name", "tw1",
    ]);
    ns.run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "tw0"]);
    ns.run(&["ip", "link", "set", "tw0", "up"]);
    ns.run(&["ip", "link", "set", "tw1", "up"]);
    ns.run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40019"]);
    let reuse = shipped_sysctl("net.ipv4.tcp_tw_reuse");
    if let Some(v) = &reuse {
        ns.run(&["sysctl", "-qw", &format!("net.ipv4.tcp_tw_reuse={v}")]);
    }
    let dir = std::env::temp_dir().join(format!("halfguard-tw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("halfguard.toml");
    std::fs::write(
        &cfg,
        "[[listeners]]\nname = \"tw\"\nbind = \"127.0.0.1:18080\"\nbackends = [\"198.18.0.1:18081\"]\n\
         [limits]\nconn_rate_per_source = 0\nmax_conns_per_source = 0\n[admin]\nbind = \"off\"\n",
    )
    .unwrap();
    let backend = ns
        .cmd(&["python3", "-c", BACKEND])
        .spawn()
        .expect("backend");
    ns.children.push(backend);
    let hg = ns
        .cmd(&[BIN, "run", "-c", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("halfguard");
    ns.children.push(hg);
    let end = Instant::now() + Duration::from_secs(10);
    while !ns.run(&["ss", "-Htln", "sport = :18080"]).contains("18080")
        || !ns.run(&["ss", "-Htln", "sport = :18081"]).contains("18081")
    {
        assert!(
            Instant::now() < end,
            "halfguard or the backend did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Ten closes: TIME_WAIT is on halfguard's backend leg, none on the backend or on
    // halfguard's client leg (the client closed first there).
    assert_eq!(ns.run(&["python3", "-c", CLIENT, "10", "0"]).trim(), "10 0");
    assert_eq!(
        ns.time_wait("dport = :18081"),
        10,
        "halfguard's backend leg"
    );
    assert_eq!(ns.time_wait("sport = :18081"), 0, "the backend");
    assert_eq!(ns.time_wait("sport = :18080"), 0, "halfguard's client leg");

    // 40 more at 8 per second: twice the port range within TIME_WAIT's 60 s. Only ports in
    // TIME_WAIT that may be reused keep them coming.
    let out = ns.run(&["python3", "-c", CLIENT, "40", "0.125"]);
    assert_eq!(
        out.trim(),
        "40 0",
        "client-first closes toward a non-loopback backend ran out of ports \
         (tcp_tw_reuse from deploy/sysctl/90-halfguard.conf: {reuse:?})"
    );
}
