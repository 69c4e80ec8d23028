//! Config fixtures (every valid one loads, every invalid one names its key), the shipped
//! default config, and environment overrides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use halfguard::config::{self, ConfigError, LogFormat, OnFull, Protocol};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_valid_fixture_loads() {
    for f in fixtures("valid") {
        if let Err(e) = config::load_with_env(&f, HashMap::new()) {
            panic!("{} should load: {e}", f.display());
        }
    }
}

#[test]
fn every_invalid_fixture_is_refused_naming_file_and_key() {
    for f in fixtures("invalid") {
        let text = std::fs::read_to_string(&f).unwrap();
        let key = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect: KEY' line", f.display()));
        let err = match config::load_with_env(&f, HashMap::new()) {
            Ok(_) => panic!("{} should be refused", f.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&f.display().to_string()),
            "{}: message does not name the file: {err}",
            f.display()
        );
        if key != "test" {
            assert!(
                err.contains(&format!("`{key}`")),
                "{}: message does not name `{key}`: {err}",
                f.display()
            );
        }
    }
}

#[test]
fn the_shipped_default_config_is_valid_and_guarded() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/halfguard.toml");
    let c = config::load_with_env(&path, HashMap::new()).expect("config/halfguard.toml");
    let l = &c.listeners[0];
    // Safe for a public-facing service: every per-source cap and the rate limit are on.
    assert!(l.limits.max_conns_per_source > 0);
    assert!(l.limits.max_half_open_per_source > 0);
    assert!(l.limits.max_half_closed_per_source > 0);
    assert!(l.limits.conn_rate_per_source > 0);
    assert_eq!(l.limits.on_full, OnFull::Evict);
    assert!(c.tcp.keepalive_idle.is_some() && c.tcp.user_timeout.is_some());
    // The file states the built-in defaults: deleting a line changes nothing.
    let defaults = halfguard::config::Limits::default();
    assert_eq!(l.limits, defaults);
    assert_eq!(l.timeouts, halfguard::config::Timeouts::default());
    assert_eq!(c.tcp, halfguard::config::TcpConfig::default());
    assert_eq!(c.pressure, halfguard::config::PressureConfig::default());
}

#[test]
fn environment_overrides_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    let c = config::load_with_env(
        &path,
        env(&[
            ("HALFGUARD__TIMEOUTS__FIRST_BYTE", "2s"),
            ("HALFGUARD__LIMITS__MAX_CONNS", "4096"),
            ("HALFGUARD__LIMITS__ON_FULL", "reject"),
            ("HALFGUARD__LIMITS__ALLOW", "10.0.0.0/8,192.0.2.7"),
            ("HALFGUARD__TCP__NODELAY", "false"),
            ("HALFGUARD__LOG__FORMAT", "json"),
        ]),
    )
    .unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.timeouts.first_byte, Duration::from_secs(2));
    assert_eq!(l.limits.max_conns, 4096);
    assert_eq!(l.limits.on_full, OnFull::Reject);
    assert_eq!(l.limits.allow.len(), 2);
    assert!(!c.tcp.nodelay);
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn a_bad_environment_override_names_the_variable_not_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    for (k, v, key) in [
        (
            "HALFGUARD__TIMEOUTS__FIRST_BYTE",
            "later",
            "timeouts.first_byte",
        ),
        (
            "HALFGUARD__TIMEOUTS__FRIST_BYTE",
            "2s",
            "timeouts.frist_byte",
        ),
        ("HALFGUARD__LIMITS__MAX_CONNS", "lots", "limits.max_conns"),
        ("HALFGUARD__LIMITS__MAX_CONNS", "0", "limits.max_conns"),
        ("HALFGUARD__LIMITS__ALLOW", "10.0.0.0/99", "limits.allow[0]"),
        ("HALFGUARD__LOG__LEVEL", "verbos", "log.level"),
    ] {
        let err = config::load_with_env(&path, env(&[(k, v)])).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == k)
                && text.contains(&format!("environment variable {k}"))
                && text.contains(&format!("`{key}`"))
                && !text.contains("minimal.toml"),
            "{k}={v}: {text}"
        );
    }
    // The same bad value in the file still names the file.
    let err = config::parse(
        "[[listeners]]\nname = \"w\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n[limits]\nmax_conns = 0\n",
        "f.toml",
        env(&[("HALFGUARD__LIMITS__MAX_SOURCES", "10")]),
    )
    .unwrap_err();
    assert!(
        matches!(err, ConfigError::Invalid { .. })
            && err.to_string().starts_with("f.toml: `limits.max_conns`"),
        "{err}"
    );
}

#[test]
fn listeners_and_pools_cannot_come_from_the_environment_and_say_so() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    for k in ["HALFGUARD__LISTENERS__BIND", "HALFGUARD__BACKENDS__NAME"] {
        let err = config::load_with_env(&path, env(&[(k, "x")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(k) && text.contains("cannot be set from the environment"),
            "{k}: {text}"
        );
    }
}

#[test]
fn a_log_level_that_would_silence_the_process_is_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    for level in ["verbose", "halfgaurd=debug", "info,halfguard=loud"] {
        let err = config::load_with_env(&path, env(&[("HALFGUARD__LOG__LEVEL", level)]))
            .expect_err(level)
            .to_string();
        assert!(err.contains("`log.level`"), "{level}: {err}");
    }
    for level in ["warn", "info,halfguard::stats=debug", "halfguard=trace"] {
        let c = config::load_with_env(&path, env(&[("HALFGUARD__LOG__LEVEL", level)]));
        assert!(c.is_ok(), "{level}: {:?}", c.err());
    }
}

#[test]
fn listener_overrides_apply_to_that_listener_only() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/overrides.toml");
    let c = config::load_with_env(&path, HashMap::new()).unwrap();
    let (web, db) = (&c.listeners[0], &c.listeners[1]);
    assert_eq!(db.protocol, Protocol::ServerFirst);
    assert_eq!(db.limits.max_conns, 100);
    assert_eq!(db.limits.on_full, OnFull::Reject);
    assert_eq!(db.timeouts.idle, Duration::from_secs(3600));
    assert_eq!(
        db.timeouts.max_lifetime,
        Some(Duration::from_secs(12 * 3600))
    );
    // Inherited from the top level by both.
    assert_eq!(db.timeouts.first_byte, Duration::from_millis(250));
    assert_eq!(db.limits.allow, web.limits.allow);
    // Not leaked into the other listener.
    assert_eq!(web.limits.max_conns, halfguard::config::DEFAULT_MAX_CONNS);
    assert_eq!(web.timeouts.idle, halfguard::config::DEFAULT_IDLE);
    assert!(web.limits.deny.is_empty());
    assert_eq!(web.timeouts.max_lifetime, None);
    assert_eq!(c.tcp.keepalive_idle, None);
}

#[test]
fn memory_marks_are_read_and_defaulted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/overrides.toml");
    let p = config::load_with_env(&path, HashMap::new())
        .unwrap()
        .pressure;
    assert_eq!(
        (p.memory_high, p.memory_low, p.tcp_mem_high),
        (0.9, 0.6, 1.0)
    );
    assert_eq!(p.tcp_mem_low, halfguard::config::DEFAULT_TCP_MEM_LOW);
    let c =
        config::load_with_env(&path, env(&[("HALFGUARD__PRESSURE__MEMORY_HIGH", "0.95")])).unwrap();
    assert_eq!(c.pressure.memory_high, 0.95);
    assert!(
        c.to_string()
            .contains("above 95% of the memory cgroup's limit until below 60%, above 100% of tcp_mem's pressure value until below 75%"),
        "check and /config show the marks: {c}"
    );
}

#[test]
fn a_user_timeout_below_the_keepalive_total_is_flagged() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    let ok = config::load_with_env(&path, HashMap::new()).unwrap();
    assert!(ok.warnings().is_empty(), "{:?}", ok.warnings());
    let short =
        config::load_with_env(&path, env(&[("HALFGUARD__TCP__USER_TIMEOUT", "10s")])).unwrap();
    let w = short.warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("tcp.user_timeout"), "{w:?}");
}

/// `section` under a minimal listener, parsed; the error as its message.
fn with(section: &str) -> Result<halfguard::Config, String> {
    let text = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:17080\"\nbackends = [\"127.0.0.1:17081\"]\n{section}\n"
    );
    config::parse(&text, "edge.toml", HashMap::new()).map_err(|e| e.to_string())
}

#[test]
fn values_at_the_kernel_and_clock_bounds_are_accepted() {
    let c = with(
        "[tcp]\nkeepalive_idle = \"32767s\"\nkeepalive_interval = \"32767s\"\nkeepalive_count = 127\nuser_timeout = \"2147483647ms\"\n[timeouts]\nidle = \"1y\"\n[limits]\nipv4_prefix = 16\nipv6_prefix = 32\nnetwork_ipv4_prefix = 16\nnetwork_ipv6_prefix = 32\n",
    )
    .unwrap();
    assert_eq!(c.tcp.keepalive_count, 127);
    assert_eq!(c.listeners[0].timeouts.idle, config::MAX_DURATION);
    // Just past each bound: refused, naming the key (the fixtures cover the rest).
    for (section, key) in [
        ("[tcp]\nuser_timeout = \"2147484s\"", "tcp.user_timeout"),
        ("[timeouts]\nidle = \"367d\"", "timeouts.idle"),
        ("[limits]\nipv4_prefix = 15", "limits.ipv4_prefix"),
    ] {
        let err = with(section).unwrap_err();
        assert!(err.contains(&format!("`{key}`")), "{section}: {err}");
    }
    // Also through the environment.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.toml");
    let err = config::load_with_env(&path, env(&[("HALFGUARD__TCP__KEEPALIVE_COUNT", "200")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`tcp.keepalive_count`"), "{err}");
}

#[test]
fn ipv4_mapped_entries_are_the_ipv4_prefixes_they_name() {
    let c = with(
        "accept_proxy = true\ntrusted_proxies = [\"::ffff:10.0.0.0/104\"]\n[limits]\nallow = [\"::ffff:192.0.2.0/120\"]\ndeny = [\"::ffff:198.18.0.7\", \"2001:db8::/32\"]\n",
    )
    .unwrap();
    let l = &c.listeners[0];
    let nets = |v: &[ipnet::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(nets(&l.trusted_proxies), ["10.0.0.0/8"]);
    assert_eq!(nets(&l.limits.allow), ["192.0.2.0/24"]);
    assert_eq!(nets(&l.limits.deny), ["198.18.0.7/32", "2001:db8::/32"]);
}

/// Connections that completed exchanges and sit idle (a pool, a Redis SUBSCRIBE, a
/// PostgreSQL LISTEN, an ssh session, a tunnel) are not cut at five minutes: the shipped
/// config and the built-in default both give `idle` an hour, as Envoy's TCP proxy does.
#[test]
fn the_idle_clock_lets_subscribers_and_pools_sit_for_an_hour() {
    assert!(halfguard::config::DEFAULT_IDLE >= Duration::from_secs(3600));
    let shipped = halfguard::config::load(std::path::Path::new("config/halfguard.toml"))
        .expect("the shipped config loads");
    for l in &shipped.listeners {
        assert!(l.timeouts.idle >= Duration::from_secs(3600), "{}", l.name);
    }
}
