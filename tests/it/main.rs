//! Integration tests: real sockets on 127.0.0.1 port 0, real backends, one test binary.

mod admin;
mod backends;
mod caps;
mod cli;
mod clocks;
mod cluster;
mod config;
mod delivery;
mod fair;
mod fds;
mod greeting;
mod halfclose;
mod holding;
mod kernel;
mod layers;
mod leaks;
mod memory;
mod passive;
mod props;
mod real_clients;
mod reload;
mod resolve;
mod stalled;
mod support;
mod timewait;
mod top;
