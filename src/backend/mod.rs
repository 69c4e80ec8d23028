//! Backend pools: choosing a server, bounded waiting, failover within the connect budget,
//! passive and active health, following names, and PROXY protocol toward the servers.
//!
//! A backend that dies, hangs or slows down must not turn into held client sockets:
//! - a server marked down (active checks, or `fall` consecutive failed connects) gets no new
//!   connections; with every server down a newcomer is refused at once;
//! - a client never judges a server: passive health counts only what a client cannot cause,
//!   and failures on our side are counted as ours;
//! - a server at its `max_conns` takes no more; when all are, a client waits in a bounded
//!   queue for at most `queue_timeout`, and the slot of a connection that is not making
//!   progress on a request (never one that awaits its answer) is taken back for it;
//! - a failed connect moves on to another server, each tried at most once, and the whole
//!   thing (queue included) never takes longer than `timeouts.connect`.
//!
//! One job per file:
//! - `pool.rs`: the [`Pool`] a listener connects through: built from the config, starts
//!   its tasks, connects with failover, the bounded queue, PROXY header out;
//! - `balance.rs`: which server next (weighted round robin, least-conn, random-two), and
//!   the set of servers a connection has tried;
//! - `resolve.rs`: configured addresses and names to servers, following names, carrying
//!   servers' state over a reload;
//! - `health.rs`: active checks (`rise`, `fall`, `on_down`);
//! - `passive.rs`: passive health: whose fault a failure is, cool-off, confirming before
//!   the last server up goes;
//! - `server.rs`: a [`Server`], one address's load and health;
//! - `lease.rs`: a connection's [`Lease`] on a server's slot, given back on drop;
//! - `slot.rs`: under `max_conns`, whether a connection may yield its slot, and the claim
//!   a queued client makes on the one that has yielded longest;
//! - `greeting.rs`: whether a server speaks first, probed once when the server layer
//!   suspects a server-first protocol behind a client-first listener.
//!
//! A connection calls [`Pool::connect`], which asks `balance` for a server, reserves a slot
//! (`server`), connects, and on failure tells `passive` and asks again; it gets back a
//! [`Lease`] it holds until it ends.

mod balance;
mod greeting;
mod health;
mod lease;
mod passive;
mod pool;
mod resolve;
mod server;
mod slot;

pub use balance::ServerSet;
pub use greeting::Greeting;
pub use lease::{Lease, aborts};
pub use pool::{BackendError, Pool, ProxiedAddrs};
pub use server::Server;
