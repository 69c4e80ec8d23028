//! The admin endpoint: metrics that match what happened, probes, `/sources`, live reload,
//! and a slowloris on the admin port that cannot keep a scrape out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use halfguard::config;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// Writes `text` to a fresh config file and starts a proxy from it, admin on port 0. The
/// file (and its dir) goes when the returned `TempFile` does.
async fn proxy_from_file(text: &str) -> (Proxy, TempFile, SocketAddr) {
    let path = TempDir::file("admin", "halfguard.toml", text);
    let cfg = config::load_with_env(&path, HashMap::new()).expect("valid test config");
    let p = Proxy::start(cfg).await;
    let admin = p.handle.admin_addr().expect("admin is on");
    (p, path, admin)
}

fn file_config(backend: SocketAddr, limits: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "{L}"
bind = "127.0.0.1:0"
backends = ["{backend}"]

[limits]
conn_rate_per_source = 0
max_conns_per_source = 0
grace = "50ms"
{limits}

[timeouts]
first_byte = "400ms"

[tcp]
keepalive_idle = "0s"

[admin]
bind = "127.0.0.1:0"
"#
    )
}

/// The value of the sample `name{labels}` in a Prometheus text scrape.
fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

async fn scrape_of(admin: SocketAddr) -> String {
    scrape(admin).await
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_an_attack_and_return_to_zero() {
    let b = backend(Backend::Echo).await;
    let (p, _path, admin) =
        proxy_from_file(&file_config(b.addr, "max_half_open_per_source = 5")).await;

    // Legit traffic: one exchange of known size, closed cleanly.
    let mut legit = connect_from("127.0.0.3", p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut legit, &[1u8; 1000]).await, vec![1u8; 1000]);
    legit.shutdown().await.unwrap();
    assert_eq!(read_end(&mut legit, ms(2000)).await, Seen::Fin(vec![]));

    // The attack: 20 silent connections from one source. All are accepted (a connection
    // counts as silent only once it has said nothing for the grace); then 5 stay and 15 are
    // refused at the source's half-open cap.
    let mut attack = Vec::new();
    for _ in 0..20 {
        // A refusal's RST can beat connect() to the socket: that is a refusal too.
        if let Ok(s) = connect_from("127.0.0.2", p.addr).await {
            attack.push(s);
        }
    }
    wait_for(ms(2000), || (p.snapshot().half_open == 5).then_some(()))
        .await
        .unwrap();
    let during = scrape(admin).await;
    let l = format!("listener=\"{L}\"");
    assert_eq!(
        sample(
            &during,
            &format!("halfguard_connections{{{l},state=\"half_open\"}}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &during,
            &format!("halfguard_connections_rejected_total{{{l},reason=\"source_half_open\"}}")
        ),
        Some(15.0)
    );
    // Accepted: the legit one and the attack's, but those that came after the first five
    // were silent past the grace are refused at accept instead (a slow machine connects the
    // twenty over more than the grace).
    let accepted = sample(
        &during,
        &format!("halfguard_connections_accepted_total{{{l}}}"),
    )
    .unwrap();
    assert!((6.0..=21.0).contains(&accepted), "{accepted}");
    assert_eq!(sample(&during, "halfguard_sources"), Some(1.0));

    // /sources names the attacker, with its refusals; never in a metric label.
    let (status, body) = http(admin, "GET", "/sources?top=5&by=refused").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let top = &v["listeners"][0]["sources"][0];
    assert_eq!(top["source"], "127.0.0.2");
    assert_eq!(top["refused"], 15);
    assert_eq!(top["half_open"], 5);
    assert!(
        !during.contains("127.0.0.2"),
        "a source address leaked into /metrics"
    );

    // The clock ends the attack; every gauge returns to zero, the counters say why.
    p.assert_drained(ms(3000)).await;
    let after = scrape(admin).await;
    for state in ["half_open", "open", "half_closed"] {
        assert_eq!(
            sample(
                &after,
                &format!("halfguard_connections{{{l},state=\"{state}\"}}")
            ),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(sample(&after, "halfguard_sources"), Some(0.0));
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_connections_timed_out_total{{{l},timeout=\"first_byte\"}}")
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_bytes_total{{{l},direction=\"upstream\"}}")
        ),
        Some(1000.0)
    );
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_bytes_total{{{l},direction=\"downstream\"}}")
        ),
        Some(1000.0)
    );
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_connection_duration_seconds_count{{{l}}}")
        ),
        Some(accepted)
    );
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_connections_closed_total{{{l},end=\"clean\"}}")
        ),
        Some(1.0)
    );
    let server = format!("backend=\"{L}\",server=\"{}\"", b.addr);
    assert_eq!(
        sample(&after, &format!("halfguard_backend_up{{{server}}}")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            &format!("halfguard_backend_connect_seconds_count{{backend=\"{L}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, &format!("halfguard_pressure{{{l}}}")),
        Some(0.0)
    );
    drop(attack);
}

#[tokio::test]
async fn probes_report_health_and_readiness() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (p, _path, admin) = proxy_from_file(&file_config(dead, "")).await;
    assert_eq!(
        http(admin, "GET", "/healthz").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http(admin, "GET", "/readyz").await.0,
        200,
        "not known to be down yet"
    );
    // `fall` (3) failed connects in a row cool the only backend off: not ready.
    for _ in 0..3 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        expect_reset(&mut c, ms(2000)).await;
    }
    let (status, body) = http(admin, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("no backend is up"), "{body}");
    let scrape = scrape(admin).await;
    let server = format!("backend=\"{L}\",server=\"{dead}\"");
    assert_eq!(
        sample(&scrape, &format!("halfguard_backend_up{{{server}}}")),
        Some(0.0)
    );
    let errors = format!("halfguard_backend_connect_errors_total{{{server}}}");
    assert_eq!(sample(&scrape, &errors), Some(3.0));
    // With every server down, a newcomer is refused at once, without a connect attempt.
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"x").await.unwrap();
    expect_reset(&mut c, ms(500)).await;
    assert_eq!(sample(&scrape_of(admin).await, &errors), Some(3.0));
    assert_eq!(http(admin, "GET", "/nope").await.0, 404);
    assert_eq!(http(admin, "POST", "/metrics").await.0, 405);
}

#[tokio::test]
async fn reload_changes_a_cap_for_new_connections_while_old_ones_flow() {
    let b = backend(Backend::Echo).await;
    let (p, path, admin) =
        proxy_from_file(&file_config(b.addr, "max_half_open_per_source = 3")).await;
    let mut old = connect_from("127.0.0.2", p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut old, b"before").await, b"before");
    let _silent = connect_from("127.0.0.2", p.addr).await.unwrap();
    wait_for(ms(1000), || (p.snapshot().half_open == 1).then_some(()))
        .await
        .unwrap();

    std::fs::write(&path, file_config(b.addr, "max_half_open_per_source = 1")).unwrap();
    let (status, body) = http(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("half-open 1"), "{body}");
    // The established connection keeps flowing...
    assert_eq!(roundtrip(&mut old, b"after").await, b"after");
    // ...and new silent connections meet the new cap at once.
    let mut refused = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut refused, ms(2000)).await;
    assert_eq!(p.snapshot().half_open, 1);
    let scrape = scrape(admin).await;
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"success\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_config() {
    let b = backend(Backend::Echo).await;
    let (p, path, admin) =
        proxy_from_file(&file_config(b.addr, "max_half_open_per_source = 1")).await;
    let before = http(admin, "GET", "/config").await.1;
    std::fs::write(
        &path,
        file_config(b.addr, "max_half_open_per_source = \"lots\""),
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/reload").await;
    assert_eq!(status, 400);
    assert!(body.contains("limits.max_half_open_per_source"), "{body}");
    assert_eq!(http(admin, "GET", "/config").await.1, before);
    // The old cap still holds.
    let _one = connect_from("127.0.0.2", p.addr).await.unwrap();
    wait_for(ms(1000), || (p.snapshot().half_open == 1).then_some(()))
        .await
        .unwrap();
    let mut two = connect_from("127.0.0.2", p.addr).await.unwrap();
    expect_reset(&mut two, ms(2000)).await;
    let scrape = scrape(admin).await;
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"failure\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"success\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let b = backend(Backend::Echo).await;
    let base = file_config(b.addr, "");
    let (p, path, admin) = proxy_from_file(&base).await;
    let extra = format!(
        "{base}\n[[listeners]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        b.addr
    );
    std::fs::write(&path, &extra).unwrap();
    assert_eq!(http(admin, "POST", "/reload").await.0, 200);
    let second = p.handle.addr("second").expect("second listener added");
    let mut c = TcpStream::connect(second).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"new").await, b"new");
    assert!(scrape(admin).await.contains("listener=\"second\""));

    std::fs::write(&path, &base).unwrap();
    assert_eq!(http(admin, "POST", "/reload").await.0, 200);
    assert!(p.handle.addr("second").is_none());
    assert!(
        TcpStream::connect(second).await.is_err(),
        "removed listener stops accepting"
    );
    // Its established connection is not dropped by the reload.
    assert_eq!(roundtrip(&mut c, b"still").await, b"still");
    // The first listener is untouched.
    let mut d = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut d, b"first").await, b"first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_admin_port_does_not_stop_a_scrape() {
    let b = backend(Backend::Echo).await;
    let (_p, _path, admin) = proxy_from_file(&file_config(b.addr, "")).await;
    // Far more dribbling connections than admin.max_conns (16), each sending part of a
    // request line and then a byte now and then.
    let mut loris = Vec::new();
    for _ in 0..64 {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await;
            loris.push(s);
        }
    }
    let dribble = tokio::spawn(async move {
        for _ in 0..20 {
            for s in loris.iter_mut() {
                let _ = s.write_all(b"a").await;
            }
            tokio::time::sleep(ms(100)).await;
        }
    });
    for _ in 0..5 {
        let t0 = tokio::time::Instant::now();
        let (status, body) =
            tokio::time::timeout(Duration::from_secs(2), http(admin, "GET", "/metrics"))
                .await
                .expect("scrape answered while the admin port is under slowloris");
        assert_eq!(status, 200);
        assert!(body.contains("halfguard_connections"));
        assert!(t0.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(ms(150)).await;
    }
    dribble.abort();
}

#[tokio::test]
async fn reloaded_clocks_apply_to_live_connections_at_once() {
    let b = backend(Backend::Echo).await;
    let with_idle = |idle: &str| {
        file_config(b.addr, "").replace(
            "first_byte = \"400ms\"",
            &format!("first_byte = \"400ms\"\nidle = \"{idle}\""),
        )
    };
    let (p, path, admin) = proxy_from_file(&with_idle("1h")).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"hi").await, b"hi");
    expect_open(&mut c, ms(300)).await;
    std::fs::write(&path, with_idle("200ms")).unwrap();
    assert_eq!(http(admin, "POST", "/reload").await.0, 200);
    // Idle for 300 ms already: the new 200 ms clock ends it at once.
    let took = expect_reset(&mut c, ms(2000)).await;
    assert!(took < ms(500), "took {took:?}");
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_we_export() {
    let b = backend(Backend::Echo).await;
    let (p, _path, admin) = proxy_from_file(&file_config(b.addr, "")).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut c, b"x").await, b"x");
    let scrape = scrape(admin).await;
    let file = TempDir::file("scrape", "scrape.txt", &scrape);
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/deploy/grafana/check-dashboard.py"))
        .arg(&file)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn config_shows_what_runs_and_what_waits_for_a_restart() {
    let b = backend(Backend::Echo).await;
    let (p, path, admin) = proxy_from_file(&format!(
        "{}\n[runtime]\nworkers = 2\n",
        file_config(b.addr, "")
    ))
    .await;
    let (_, body) = http(admin, "GET", "/config").await;
    assert!(
        body.contains("runtime: 2 worker threads") && !body.contains("waiting for a restart"),
        "{body}"
    );

    std::fs::write(
        &path,
        format!(
            "{}\n[runtime]\nworkers = 1\n",
            file_config(b.addr, "max_conns = 100")
        ),
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(
            "reloaded; changed: listener \"t\": limits; [runtime] (at the next restart)\n"
        ),
        "the reload says what changed: {body}"
    );
    let (_, body) = http(admin, "GET", "/config").await;
    let (running, waiting) = body
        .split_once("waiting for a restart")
        .unwrap_or_else(|| panic!("no restart-only section: {body}"));
    assert!(
        running.contains("runtime: 2 worker threads") && running.contains("conns 100,"),
        "what runs: {running}"
    );
    assert!(
        waiting
            .lines()
            .any(|l| l.trim().starts_with("runtime: 1 worker thread;"))
            && !waiting.contains("conns 100"),
        "what waits: {waiting}"
    );
    drop(p);
}

/// A token long enough to be accepted.
const TOKEN: &str = "test-admin-token-0123456789";

/// Sends `head` (request line and headers, without the blank line) plus `body` from the
/// loopback address `from`: (status, headers and body).
async fn raw_http(admin: SocketAddr, from: &str, head: &str, body: &str) -> (u16, String) {
    raw_http_after(admin, from, Duration::ZERO, head, body).await
}

/// The same, `think` after the connection is made (a busy prober, a long path).
async fn raw_http_after(
    admin: SocketAddr,
    from: &str,
    think: Duration,
    head: &str,
    body: &str,
) -> (u16, String) {
    let mut s = connect_from(from, admin).await.expect("connect to admin");
    tokio::time::sleep(think).await;
    let req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let _ = s.read_to_end(&mut raw).await;
    })
    .await
    .expect("admin answers in time");
    let raw = String::from_utf8_lossy(&raw).to_string();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw)
}

/// A request from 127.0.0.1 with an address for Host, plus `extra` header lines.
async fn req(admin: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String) {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("\r\n{extra}")
    };
    raw_http(
        admin,
        "127.0.0.1",
        &format!("{method} {path} HTTP/1.1\r\nHost: {admin}{extra}"),
        "",
    )
    .await
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}")
}

#[tokio::test]
async fn private_endpoints_need_the_token_and_probes_do_not() {
    let b = backend(Backend::Echo).await;
    let dir = std::env::temp_dir().join(format!("halfguard-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin-token"), format!("{TOKEN}\n")).unwrap();
    // Loopback not trusted: every client is treated as a remote one.
    let text = file_config(b.addr, "").replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken_file = \"{}\"\ntrust_loopback = false\n",
            dir.join("admin-token").display()
        ),
    );
    let (p, path, admin) = proxy_from_file(&text).await;

    for probe in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            req(admin, "GET", probe, "").await.0,
            200,
            "{probe} is public"
        );
    }
    for private in ["/sources", "/config"] {
        let (status, raw) = req(admin, "GET", private, "").await;
        assert_eq!(status, 401, "{private} without a token: {raw}");
        assert!(
            raw.contains("WWW-Authenticate: Bearer") || raw.contains("www-authenticate: Bearer"),
            "{raw}"
        );
        let wrong = bearer("test-admin-token-0123456788");
        assert_eq!(req(admin, "GET", private, &wrong).await.0, 401, "{private}");
        let (status, raw) = req(admin, "GET", private, &bearer(TOKEN)).await;
        assert_eq!(status, 200, "{private} with the token: {raw}");
        assert!(!raw.contains(TOKEN), "the token is never echoed");
    }
    let (_, config) = req(admin, "GET", "/config", &bearer(TOKEN)).await;
    assert!(config.contains("Bearer token from the file"), "{config}");

    // Reload: refused without the token, and nothing was re-read.
    std::fs::write(
        &path,
        file_config(b.addr, "max_half_open_per_source = 1").replace(
            "[admin]\n",
            &format!(
                "[admin]\ntoken_file = \"{}\"\ntrust_loopback = false\n",
                dir.join("admin-token").display()
            ),
        ),
    )
    .unwrap();
    assert_eq!(req(admin, "POST", "/reload", "").await.0, 401);
    let scrape = scrape(admin).await;
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"success\"}"
        ),
        Some(0.0)
    );
    let (status, raw) = req(admin, "POST", "/reload", &bearer(TOKEN)).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(
        p.handle.config().listeners[0]
            .limits
            .max_half_open_per_source,
        1
    );
}

#[tokio::test]
async fn a_reload_rotates_the_token_and_applies_trust_loopback_and_drain_delay() {
    const ROTATED: &str = "rotated-admin-token-9876543210";
    let b = backend(Backend::Echo).await;
    let token = TempDir::file("admin", "admin-token", &format!("{TOKEN}\n"));
    let text = |admin: &str| {
        file_config(b.addr, "").replace(
            "[admin]\nbind = \"127.0.0.1:0\"\n",
            &format!("[admin]\ntoken_file = \"{}\"\n{admin}\n", token.display()),
        )
    };
    let (p, path, admin) = proxy_from_file(&text(
        "bind = \"127.0.0.1:0\"\ntrust_loopback = false\ndrain_delay = \"5s\"",
    ))
    .await;
    assert_eq!(req(admin, "GET", "/sources", &bearer(TOKEN)).await.0, 200);

    // The token leaked: a new one in the file, and a reload (with the old one, the one in
    // force until then).
    std::fs::write(&*token, format!("{ROTATED}\n")).unwrap();
    std::fs::write(
        &path,
        text("bind = \"127.0.0.1:0\"\ntrust_loopback = false\ndrain_delay = \"2s\""),
    )
    .unwrap();
    let (status, raw) = req(admin, "POST", "/reload", &bearer(TOKEN)).await;
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains("reloaded; changed: [admin] token, drain_delay\n"),
        "{raw}"
    );
    assert!(!raw.contains(ROTATED) && !raw.contains(TOKEN), "{raw}");
    for private in ["/sources", "/config"] {
        assert_eq!(
            req(admin, "GET", private, &bearer(TOKEN)).await.0,
            401,
            "{private}: the old token still opens it"
        );
        assert_eq!(req(admin, "GET", private, "").await.0, 401, "{private}");
        assert_eq!(
            req(admin, "GET", private, &bearer(ROTATED)).await.0,
            200,
            "{private}: the new token is refused"
        );
    }
    // The delay SIGTERM waits is the new one, in what runs, not under what waits.
    assert_eq!(p.handle.config().admin.drain_delay, ms(2000));
    let (_, config) = req(admin, "GET", "/config", &bearer(ROTATED)).await;
    assert!(
        config.contains("drain_delay 2s") && !config.contains("waiting for a restart"),
        "{config}"
    );

    // Loopback trusted again, and a new admin bind: the one applies now, the other says it
    // waits for a restart (the socket is made once).
    std::fs::write(
        &path,
        text("bind = \"127.0.0.2:0\"\ntrust_loopback = true\ndrain_delay = \"2s\""),
    )
    .unwrap();
    let (status, raw) = req(admin, "POST", "/reload", &bearer(ROTATED)).await;
    assert_eq!(status, 200, "{raw}");
    assert!(
        raw.contains(
            "reloaded; changed: [admin] trust_loopback; [admin] bind (at the next restart)\n"
        ),
        "{raw}"
    );
    assert_eq!(req(admin, "GET", "/sources", "").await.0, 200);
    let (_, config) = req(admin, "GET", "/config", "").await;
    let (running, waiting) = config
        .split_once("waiting for a restart")
        .unwrap_or_else(|| panic!("the new bind waits: {config}"));
    assert!(
        running.contains("admin: 127.0.0.1:0,") && waiting.contains("admin: 127.0.0.2:0,"),
        "{config}"
    );
    drop(p);
}

#[tokio::test]
async fn loopback_needs_no_token_but_a_rebound_name_gets_nothing() {
    let b = backend(Backend::Echo).await;
    let (_p, _path, admin) = proxy_from_file(&file_config(b.addr, "")).await;
    assert_eq!(req(admin, "GET", "/sources", "").await.0, 200);
    // A browser page whose name was rebound to 127.0.0.1 sends its own name as Host.
    let (status, _) = raw_http(
        admin,
        "127.0.0.1",
        "GET /sources HTTP/1.1\r\nHost: rebind.example:9901",
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = raw_http(
        admin,
        "127.0.0.1",
        "GET /config HTTP/1.1\r\nHost: localhost:9901",
        "",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_cross_site_request_cannot_reload() {
    let b = backend(Backend::Echo).await;
    let (_p, _path, admin) = proxy_from_file(&file_config(b.addr, "")).await;
    let host = format!("POST /reload HTTP/1.1\r\nHost: {admin}");
    for (extra, body) in [
        ("Origin: https://evil.example", ""),
        ("Origin: null", ""),
        ("Sec-Fetch-Site: cross-site", ""),
        ("Content-Type: application/x-www-form-urlencoded", "a=b"),
        ("Content-Type: text/plain", "x"),
        ("Content-Type: multipart/form-data; boundary=x", "--x--"),
    ] {
        let (status, raw) = raw_http(admin, "127.0.0.1", &format!("{host}\r\n{extra}"), body).await;
        assert_eq!(status, 403, "{extra}: {raw}");
    }
    let scrape = scrape(admin).await;
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"success\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "halfguard_config_reloads_total{result=\"failure\"}"
        ),
        Some(0.0)
    );
    // What curl -X POST sends still works.
    assert_eq!(raw_http(admin, "127.0.0.1", &host, "").await.0, 200);
}

#[tokio::test]
async fn the_token_comes_from_the_environment_or_a_file_never_the_config() {
    let text =
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n";
    let env = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
    let c = config::parse(text, "t.toml", env("HALFGUARD_ADMIN_TOKEN", TOKEN)).unwrap();
    assert!(
        c.admin
            .token
            .as_ref()
            .is_some_and(|t| t.matches(TOKEN.as_bytes()))
    );
    assert!(!c.to_string().contains(TOKEN) && !format!("{c:?}").contains(TOKEN));
    // Too short: refused, naming the variable, without printing it.
    let e = config::parse(text, "t.toml", env("HALFGUARD_ADMIN_TOKEN", "hunter2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HALFGUARD_ADMIN_TOKEN") && !e.contains("hunter2"),
        "{e}"
    );
    // A token is not a config key: in the file or as an override it is an unknown key.
    let e = config::parse(
        &format!("{text}[admin]\ntoken = \"{TOKEN}\"\n"),
        "t.toml",
        HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("admin.token") && e.contains("unknown key"),
        "{e}"
    );
    let e = config::parse(text, "t.toml", env("HALFGUARD__ADMIN__TOKEN", TOKEN))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key"), "{e}");
    // A missing token file names the key and the file.
    let e = config::parse(
        &format!("{text}[admin]\ntoken_file = \"/nonexistent/admin-token\"\n"),
        "t.toml",
        HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("admin.token_file") && e.contains("/nonexistent/admin-token"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_under_an_admin_connection_flood() {
    let b = backend(Backend::Echo).await;
    let (_p, _path, admin) = proxy_from_file(&file_config(b.addr, "")).await;
    // A flood from 127.0.0.2: as many admin connections as it can open for 3 s, each with
    // a request that never ends, held until the flood stops (bounded in count and time).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                n += 1;
                if let Ok(Ok(mut s)) =
                    tokio::time::timeout(ms(200), connect_from("127.0.0.2", admin)).await
                {
                    let _ = s
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX: ")
                        .await;
                    held.push(s);
                    if held.len() > 200 {
                        held.remove(0);
                    }
                }
            }
            n
        }));
    }
    tokio::time::sleep(ms(200)).await;
    let mut failed = Vec::new();
    let t0 = tokio::time::Instant::now();
    let mut probes = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        probes += 1;
        let path = if probes % 2 == 0 {
            "/healthz"
        } else {
            "/readyz"
        };
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            // The request follows the handshake by 20 ms, as from a busy kubelet.
            raw_http_after(
                admin,
                "127.0.0.3",
                ms(20),
                &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1"),
                "",
            ),
        )
        .await;
        match r {
            Ok((200, _)) => {}
            Ok((s, raw)) => failed.push(format!("{path}: {s} {raw}")),
            Err(_) => failed.push(format!("{path}: no answer within 1 s")),
        }
        tokio::time::sleep(ms(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut opened = 0;
    for f in flooders {
        opened += f.await.unwrap();
    }
    eprintln!(
        "flood opened {opened} admin connections; {probes} probes, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {probes} probes failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}
