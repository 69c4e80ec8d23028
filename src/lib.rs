//! halfguard: a reverse TCP proxy where every connection state has a cap and a clock.
//!
//! It stands in front of one service and keeps it reachable while peers try to exhaust it
//! with useless connections: **half-open** (accepted but silent), **half-closed** (one side
//! sent FIN, the other lingers) and **zombies** (the peer vanished without FIN or RST).
//! Every connection is in exactly one accounted state; each state is capped per source and
//! per listener and has a linger clock; whatever overstays is aborted with RST.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and `HALFGUARD__*` overrides -> a validated [`config::Config`].
//! - [`server`]: the top: running listeners, live reload, upkeep, graceful shutdown, and the
//!   admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/sources`, `/config`,
//!   `POST /reload`). Nothing below imports it.
//! - [`listener`]: the accept loop (admission at accept, EMFILE backoff).
//! - [`guard`]: source keys, the source table, admission, eviction, the RAII [`guard::Ticket`],
//!   the per-source rate, pressure mode.
//! - [`conn`]: one connection's task, its state machine and clocks, and the two-way pump.
//! - [`kernel`]: the socket census (sock_diag) and halfguard's own nftables table.
//! - [`cluster`]: `[cluster]`: per-source counts and bans shared by replicas through Redis,
//!   synced in the background; admission reads the last view, never waits for Redis.
//! - [`backend`]: backend selection and connect (round robin, failover).
//! - [`sockopt`]: socket options, RST aborts, the kernel send queue.
//! - [`fds`]: the descriptor budget: listener caps and splice pipes cut to fit the
//!   open-files limit.
//! - `splice` (Linux): zero-copy forwarding for bulk transfers, within a pipe budget.
//! - [`first_message`]: whether the bytes a client-first connection holds make its first
//!   message whole (HTTP, TLS, PostgreSQL), so the backend is reached only then.
//! - [`stats`]: counters with static reasons, and the rate-limited summary log.
//! - [`bell`]: what every connection of a listener must hear of (pressure, reload, abort),
//!   one waiter per connection.
//! - [`memory`]: the kernel's TCP memory and the memory cgroup's usage against their limits,
//!   read from `/proc` and `/sys/fs/cgroup`: an input of pressure mode.
//! - [`histo`]: histograms of atomics, observed on the hot path and read at scrape time.
//! - [`metrics`]: Prometheus text built at scrape time from a snapshot the server gathers.
//! - [`shutdown`], [`logging`]: signals and log setup.
//! - [`turn`]: a worker thread's turns on its core (`[runtime] slice`): short ones, and its
//!   core yielded before it sleeps.
//! - [`top`]: `halfguard top`, the live terminal view, a client of the admin endpoint.
#![deny(unsafe_code)]

pub mod backend;
pub mod bell;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fds;
pub mod first_message;
pub mod guard;
pub mod histo;
pub mod kernel;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod proxy_protocol;
pub mod server;
pub mod shards;
pub mod shutdown;
pub mod sockopt;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod stats;
pub mod steal;
pub mod top;
pub mod turn;

pub use config::Config;
pub use server::{Handle, Server, ServerError, run};
