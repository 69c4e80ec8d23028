//! Configuration: `config.toml -> RawConfig -> Config`.
//!
//! [`load`] layers the TOML file and the `HALFGUARD__SECTION__KEY` environment overrides with
//! the `config` crate and deserialises them into the raw structs, which refuse unknown keys.
//! [`Config::from_raw`] then has each section check itself and checks what spans sections
//! (names, binds, the pool a listener names), so the rest of the proxy only ever sees a
//! validated, typed `Config`. Every error names the file and the key.
//!
//! One file per section, each holding the section's raw table, its validated type with
//! its defaults, the `from_raw` step between them, and its part of the `Display` that
//! `halfguard check` and `/config` print: `listener.rs` (`[[listeners]]`), `limits.rs`,
//! `timeouts.rs`, `pressure.rs`, `tcp.rs`, `admin.rs` (and `token.rs`, the admin token),
//! `log.rs`, `pool.rs` (`[[backends]]`), `kernel.rs`, `runtime.rs`, `cluster.rs`. `file.rs`
//! is the whole file's raw shape, `addr.rs` the addresses and networks as written, `load.rs`
//! the layering of file and environment, `server_first.rs` the well-known ports whose
//! server greets first (a warning on a client-first listener).
//!
//! Every default is a documented constant beside its section; `config/halfguard.toml`
//! repeats them with the reasoning an operator needs.

mod addr;
mod admin;
mod choice;
mod cluster;
mod file;
mod kernel;
mod limits;
mod listener;
mod load;
mod log;
mod pool;
mod pressure;
mod runtime;
mod server_first;
mod tcp;
mod timeouts;
mod token;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use choice::Choice;

pub use addr::{ServerAddr, Target};
pub use admin::{
    AdminConfig, DEFAULT_ADMIN_BIND, DEFAULT_ADMIN_HEADER_TIMEOUT, DEFAULT_ADMIN_MAX_CONNS,
    DEFAULT_ADMIN_PROBE_CONNS, DEFAULT_DRAIN_DELAY, RawAdmin,
};
pub use cluster::{ClusterConfig, RawCluster, RedisUrl, check_node, host_name};
pub use file::{MAX_DURATION, RawConfig, RawDuration};
pub use kernel::{DEFAULT_CENSUS_INTERVAL, DEFAULT_UNTRACKED_SYN_RATE, KernelConfig, RawKernel};
pub use limits::{
    DEFAULT_CONN_BURST_PER_SOURCE, DEFAULT_CONN_RATE_PER_SOURCE, DEFAULT_GRACE,
    DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, DEFAULT_MAX_CONNS, DEFAULT_MAX_CONNS_PER_NETWORK,
    DEFAULT_MAX_CONNS_PER_SOURCE, DEFAULT_MAX_HALF_CLOSED, DEFAULT_MAX_HALF_CLOSED_PER_SOURCE,
    DEFAULT_MAX_HALF_OPEN, DEFAULT_MAX_HALF_OPEN_PER_SOURCE, DEFAULT_MAX_SOURCES, DEFAULT_MIN_RATE,
    DEFAULT_NETWORK_IPV4_PREFIX, DEFAULT_NETWORK_IPV6_PREFIX, Limits, MIN_IPV4_PREFIX,
    MIN_IPV6_PREFIX, Mode, OnFull, RawLimits,
};
pub use listener::{FirstMessage, ListenerConfig, Protocol, RawListener};
pub use load::{ENV_PREFIX, ENV_SEPARATOR, load, load_with_env, parse};
pub use log::{LogConfig, LogFormat, RawLog, check_filter};
pub use pool::{
    Balance, DEFAULT_COOLOFF, DEFAULT_FALL, DEFAULT_HEALTH_INTERVAL, DEFAULT_RISE, HealthConfig,
    OnDown, PoolConfig, ProxyVersion, RawHealth, RawPool, RawServer, ServerConfig,
};
pub use pressure::{
    DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, DEFAULT_MEMORY_HIGH, DEFAULT_MEMORY_LOW,
    DEFAULT_PRESSURE_FIRST_BYTE, DEFAULT_PRESSURE_HALF_CLOSED, DEFAULT_PRESSURE_IDLE,
    DEFAULT_PRESSURE_REQUEST, DEFAULT_TCP_MEM_HIGH, DEFAULT_TCP_MEM_LOW, PressureConfig,
    RawPressure,
};
pub use runtime::{MAX_WORKERS, RawRuntime, RuntimeConfig};
pub use tcp::{
    DEFAULT_BACKLOG, DEFAULT_KEEPALIVE_COUNT, DEFAULT_KEEPALIVE_IDLE, DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_NOTSENT_LOWAT, DEFAULT_USER_TIMEOUT, MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_TIME,
    MAX_USER_TIMEOUT, RawTcp, TcpConfig,
};
pub use timeouts::{
    DEFAULT_CONNECT, DEFAULT_DRAIN, DEFAULT_FIRST_BYTE, DEFAULT_HALF_CLOSED, DEFAULT_IDLE,
    DEFAULT_REQUEST, DEFAULT_SLOW_READER_MAX, DEFAULT_WRITE_STALL, RawTimeouts, SLOW_READER_WINDOW,
    Timeouts,
};
pub use token::{ADMIN_TOKEN_ENV, AdminToken, MIN_TOKEN_LEN, TokenSource};

/// A configuration that failed to load or validate. Every variant names the file, or the
/// environment variable that holds the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value has the wrong type or an unknown key.
    #[error("{file}: {source}")]
    Load {
        file: String,
        #[source]
        source: config::ConfigError,
    },
    /// A value parsed but makes no sense.
    #[error("{file}: `{key}`: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
    /// A `HALFGUARD__*` override holds a bad value, or sets what the environment cannot
    /// (`[[listeners]]`, `[[backends]]`): the variable is named, not the file it overrides.
    #[error("environment variable {var}: `{key}`: {reason}")]
    Env {
        var: String,
        key: String,
        reason: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from, for messages.
    pub file: String,
    pub listeners: Vec<ListenerConfig>,
    pub pressure: PressureConfig,
    pub tcp: TcpConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    /// Every pool: the `[[backends]]` tables, then one per listener using the short form.
    pub pools: Vec<PoolConfig>,
    pub kernel: KernelConfig,
    pub runtime: RuntimeConfig,
    /// `[cluster]`: `None` runs a single node. Read at start only.
    pub cluster: Option<ClusterConfig>,
}

/// Makes the errors of every section's checks: each names the file and a key.
struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The choice spelt `raw` at `key`, or `default` when the key is not set.
    fn choice<T: Choice>(
        &self,
        raw: Option<&str>,
        key: impl Into<String>,
        default: T,
    ) -> Result<T, ConfigError> {
        raw.map_or(Ok(default), |s| {
            choice::parse(s).map_err(|r| self.err(key, r))
        })
    }

    /// The choice spelt `raw` at `key`, where `"off"` (or no key) is `None`.
    fn choice_or_off<T: Choice>(
        &self,
        raw: Option<&str>,
        key: impl Into<String>,
    ) -> Result<Option<T>, ConfigError> {
        raw.map_or(Ok(None), |s| {
            choice::parse_or_off(s).map_err(|r| self.err(key, r))
        })
    }
}

/// What the sections checked so far have claimed, for the checks that span them: listener
/// names and binds are unique, pool names (a short `backends` list's included) are unique,
/// and a listener's `backend` names a pool. Each is asked as its key is read, so a file
/// with several mistakes is told of the first.
#[derive(Default)]
struct Taken {
    /// Fixed-port binds only: port 0 is a new port each time, so it cannot clash.
    listener_names: HashSet<String>,
    binds: HashSet<SocketAddr>,
    pools: Vec<PoolConfig>,
}

impl Taken {
    /// `backends[i]`, whose name no earlier pool may have.
    fn pool(&mut self, ck: &Checker<'_>, pool: PoolConfig, i: usize) -> Result<(), ConfigError> {
        if self.pools.iter().any(|q| q.name == pool.name) {
            return Err(ck.err(
                format!("backends[{i}].name"),
                format!("{:?} is used by two pools", pool.name),
            ));
        }
        self.pools.push(pool);
        Ok(())
    }

    fn listener_name(
        &mut self,
        ck: &Checker<'_>,
        name: &str,
        key: String,
    ) -> Result<(), ConfigError> {
        if !self.listener_names.insert(name.to_string()) {
            return Err(ck.err(key, format!("{name:?} is used by two listeners")));
        }
        Ok(())
    }

    fn bind(&mut self, ck: &Checker<'_>, bind: SocketAddr, key: String) -> Result<(), ConfigError> {
        if bind.port() != 0 && !self.binds.insert(bind) {
            return Err(ck.err(key, format!("{bind} is bound by two listeners")));
        }
        Ok(())
    }

    fn pool_named(&self, ck: &Checker<'_>, pool: &str, key: String) -> Result<(), ConfigError> {
        if !self.pools.iter().any(|p| p.name == pool) {
            return Err(ck.err(key, format!("no [[backends]] pool is named {pool:?}")));
        }
        Ok(())
    }

    /// A listener's short `backends` list: a pool named after the listener (`key`).
    fn short_pool(
        &mut self,
        ck: &Checker<'_>,
        pool: PoolConfig,
        key: String,
    ) -> Result<(), ConfigError> {
        if self.pools.iter().any(|p| p.name == pool.name) {
            return Err(ck.err(
                key,
                format!(
                    "{:?} is also a [[backends]] pool's name; the short `backends` list makes a pool named after the listener",
                    pool.name
                ),
            ));
        }
        self.pools.push(pool);
        Ok(())
    }
}

impl Config {
    /// Applies defaults and overrides to the raw file and checks every value: each section
    /// in turn, in the order of this function, and what spans sections through [`Taken`].
    pub fn from_raw(raw: RawConfig, file: &str) -> Result<Config, ConfigError> {
        let ck = Checker { file };
        if raw.listeners.is_empty() {
            return Err(ck.err("listeners", "at least one [[listeners]] table is required"));
        }
        let limits = Limits::from_raw(&ck, &Limits::default(), &raw.limits, "limits")?;
        let timeouts = Timeouts::from_raw(&ck, &Timeouts::default(), &raw.timeouts, "timeouts")?;
        let mut taken = Taken::default();
        for (i, p) in raw.backends.iter().enumerate() {
            taken.pool(&ck, PoolConfig::from_raw(&ck, p, i)?, i)?;
        }
        let listeners = (raw.listeners.iter().enumerate())
            .map(|(i, l)| ListenerConfig::from_raw(&ck, l, i, (&limits, &timeouts), &mut taken))
            .collect::<Result<Vec<_>, _>>()?;
        let pressure = PressureConfig::from_raw(&ck, &raw.pressure)?;
        let tcp = TcpConfig::from_raw(&ck, &raw.tcp)?;
        let log = LogConfig::from_raw(&ck, &raw.log)?;
        let admin = AdminConfig::from_raw(&ck, &raw.admin)?;
        if let Some(b) = admin.bind
            && taken.binds.contains(&b)
        {
            return Err(ck.err("admin.bind", format!("{b} is also a listener's bind")));
        }
        let kernel = KernelConfig::from_raw(&ck, &raw.kernel)?;
        let runtime = RuntimeConfig::from_raw(&ck, &raw.runtime)?;
        let cluster = (raw.cluster.as_ref())
            .map(|c| ClusterConfig::from_raw(&ck, c))
            .transpose()?;
        Ok(Config {
            file: file.to_string(),
            listeners,
            pressure,
            tcp,
            log,
            admin,
            pools: taken.pools,
            kernel,
            runtime,
            cluster,
        })
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The effective configuration in a few lines, for `halfguard check` and the start log.
    pub fn summary(&self) -> String {
        self.to_string()
    }

    /// Settings that are valid but probably not what the operator means.
    pub fn warnings(&self) -> Vec<String> {
        (self.listeners.iter().map(ListenerConfig::warning))
            .chain([self.tcp.warning()])
            .flatten()
            .chain(server_first::warnings(self))
            .collect()
    }
}

/// Every section's lines, in the order of the file's reference: listeners, pools,
/// pressure, tcp, admin, kernel, log, runtime, and the cluster if there is one.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "config {}: {} listener(s)",
            self.file,
            self.listeners.len()
        )?;
        for l in &self.listeners {
            writeln!(f, "{l}")?;
        }
        for p in &self.pools {
            writeln!(f, "{p}")?;
        }
        writeln!(f, "{}", self.pressure)?;
        writeln!(f, "{}", self.tcp)?;
        writeln!(f, "{}", self.admin)?;
        writeln!(f, "{}", self.kernel)?;
        writeln!(f, "{}", self.log)?;
        write!(f, "{}", self.runtime)?;
        if let Some(c) = &self.cluster {
            write!(f, "\n{c}")?;
        }
        Ok(())
    }
}

/// `"0s"` turns an optional clock off.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// A duration as `check` and `/config` print it: `5m`, `250ms`.
fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A cap as printed: 0 is `none`.
fn cap(c: u32) -> String {
    if c == 0 {
        "none".to_string()
    } else {
        c.to_string()
    }
}

/// A rate as `check` prints it: `10/s burst 40`, or `none` when off (0), since a burst
/// with no rate bounds nothing.
fn rate(per_second: u32, burst: Option<u32>) -> String {
    match (per_second, burst) {
        (0, _) => "none".to_string(),
        (r, Some(b)) => format!("{r}/s burst {b}"),
        (r, None) => format!("{r}/s"),
    }
}
