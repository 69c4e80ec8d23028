//! Backend names: every address a name resolves to is a server of its own, and the set
//! follows the name. The name lives in a hosts file bind-mounted over /etc/hosts in a mount
//! namespace of halfguard's own, so the test changes what it resolves to while it runs.
//! As root that is `unshare -m`; otherwise `unshare -rm` (a user namespace of its own, which
//! most distributions allow). Needs util-linux; without either way the test is skipped and
//! says why.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::cli::{Reap, free_port, start};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_halfguard");

/// Counted echo servers on 127.0.0.2:port and 127.0.0.3:port.
async fn two_echoes() -> (u16, [Counted; 2]) {
    for _ in 0..20 {
        let a = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind(("127.0.0.3", port)).await {
            return (port, [echo_on(a), echo_on(b)]);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// `n` round trips through the proxy; returns how many connections each server gained.
async fn traffic(proxy: SocketAddr, n: usize, echoes: &[Counted; 2]) -> [u64; 2] {
    let served = || echoes.each_ref().map(|e| e.served.load(Ordering::Relaxed));
    let before = served();
    for _ in 0..n {
        let mut c = TcpStream::connect(proxy).await.unwrap();
        assert_eq!(roundtrip(&mut c, b"hi").await, b"hi");
    }
    let after = served();
    [after[0] - before[0], after[1] - before[1]]
}

/// The `server` labels of `halfguard_backend_up` that read 1.
async fn servers_up(admin: SocketAddr) -> Vec<String> {
    let (_, body) = http(admin, "GET", "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("halfguard_backend_up{") && l.ends_with(" 1"))
        .filter_map(|l| l.split("server=\"").nth(1))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect()
}

async fn wait_servers(admin: SocketAddr, want: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = servers_up(admin).await;
        seen.sort();
        if seen == want {
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    seen
}

#[tokio::test]
async fn a_name_is_every_address_it_resolves_to_and_the_set_follows_the_name() {
    crate::require!("a mount namespace"; Need::Tool("unshare"), Need::Tool("mount"));
    // Root makes the namespace itself; anyone else needs a user namespace for it.
    let unshare = if is_root() {
        "-m"
    } else {
        crate::require!("a mount namespace"; Need::UserNamespace);
        "-rm"
    };
    let (port, echoes) = two_echoes().await;
    let name = format!("halfguard-it-{}", std::process::id());
    let tmp = TempDir::new("resolve");
    let dir = tmp.path();
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("127.0.0.2 {name}\n")).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let cfg = dir.join("halfguard.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:{listen}"
backend = "app"

[[backends]]
name = "app"
servers = [{{ addr = "{name}:{port}" }}]
resolve_interval = "100ms"
[backends.health]
interval = "100ms"

[admin]
bind = "127.0.0.1:{admin}"
"#
        ),
    )
    .unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([unshare, "sh", "-c"]).arg(format!(
        "mount --bind '{}' /etc/hosts && exec '{BIN}' run -c '{}'",
        hosts.display(),
        cfg.display()
    ));
    let _child = Reap(start(cmd));
    let proxy: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let label = |ip: &str| format!("{name}:{port}@{ip}");

    // One address: one server, all traffic to it.
    let result = async {
        assert_eq!(
            wait_servers(admin, &[label("127.0.0.2")]).await,
            [label("127.0.0.2")]
        );
        assert_eq!(traffic(proxy, 6, &echoes).await, [6, 0]);

        // The name gains an address: a second server, and round robin spreads over both.
        // Rewritten in place: the bind mount holds the file, not the name.
        std::fs::write(&hosts, format!("127.0.0.2 {name}\n127.0.0.3 {name}\n")).unwrap();
        let both = vec![label("127.0.0.2"), label("127.0.0.3")];
        assert_eq!(wait_servers(admin, &both).await, both);
        assert_eq!(traffic(proxy, 10, &echoes).await, [5, 5]);

        // The name loses its first address: that server is gone, the other takes it all.
        std::fs::write(&hosts, format!("127.0.0.3 {name}\n")).unwrap();
        assert_eq!(
            wait_servers(admin, &[label("127.0.0.3")]).await,
            [label("127.0.0.3")]
        );
        assert_eq!(traffic(proxy, 6, &echoes).await, [0, 6]);
    };
    let outcome = tokio::time::timeout(Duration::from_secs(30), result).await;
    outcome.expect("the test ran within 30 s");
}
