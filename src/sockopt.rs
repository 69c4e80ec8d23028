//! Socket options in one place: listener setup, dead-peer detection, abort with RST, and the
//! kernel send queue that tells a slow reader from a gone one.
//!
//! Keepalive and TCP_USER_TIMEOUT are the dead-peer detector: keepalive probes find an idle
//! peer that vanished, TCP_USER_TIMEOUT a peer that stopped acknowledging our data. Linux
//! copies them (and TCP_NODELAY) from a listening socket to the sockets it accepts, so they
//! are set once on the listener, and on every backend socket before it connects.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::config::TcpConfig;

/// A `[tcp]` option the kernel refused, named by its config key, so the operator is told
/// which line to fix rather than a bare "invalid argument".
#[derive(Debug, thiserror::Error)]
#[error("the kernel refuses {option} = {value}: {source}")]
pub struct SockoptError {
    pub option: &'static str,
    pub value: String,
    #[source]
    pub source: io::Error,
}

impl From<SockoptError> for io::Error {
    fn from(e: SockoptError) -> io::Error {
        // Not the kernel's errno any more: a connect failing here is our doing, not the
        // server's.
        io::Error::new(e.source.kind(), e)
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The error for `option` refused. `apply` runs for every backend connect: the value is
/// only formatted on a refusal.
fn refused(
    option: &'static str,
    value: impl FnOnce() -> String,
) -> impl FnOnce(io::Error) -> SockoptError {
    move |source| SockoptError {
        option,
        value: value(),
        source,
    }
}

/// Applies keepalive, TCP_USER_TIMEOUT and TCP_NODELAY from `[tcp]`, "off" included: a live
/// socket (a listener on reload) may have them on.
pub fn apply(sock: SockRef<'_>, tcp: &TcpConfig) -> Result<(), SockoptError> {
    set(
        sock,
        tcp,
        Needs {
            offs: true,
            probes: true,
        },
    )
}

/// The `[tcp]` options for a fresh socket toward `peer`, in as few calls as it takes: a fresh
/// socket already has keepalive, `TCP_USER_TIMEOUT` and `TCP_NODELAY` off, so "off" costs no
/// call; and toward a loopback peer (a sidecar's backend) keepalive and `TCP_USER_TIMEOUT`
/// are left off, since the kernel holds both ends: a peer process that dies has its sockets
/// closed for it, and one that hangs is acknowledged by the kernel all the same, so neither
/// probe could tell anything the `idle` and `write_stall` clocks do not. Five calls fewer
/// per backend connection.
fn apply_fresh(sock: SockRef<'_>, tcp: &TcpConfig, peer: SocketAddr) -> Result<(), SockoptError> {
    let loopback = peer.ip().to_canonical().is_loopback();
    set(
        sock,
        tcp,
        Needs {
            offs: false,
            probes: !loopback,
        },
    )
}

/// Which of the `[tcp]` options a socket needs set.
#[derive(Clone, Copy)]
struct Needs {
    /// Options configured off are set too (the socket may have them on).
    offs: bool,
    /// Keepalive and `TCP_USER_TIMEOUT`, the dead-peer probes.
    probes: bool,
}

fn set(sock: SockRef<'_>, tcp: &TcpConfig, needs: Needs) -> Result<(), SockoptError> {
    if needs.offs || tcp.nodelay {
        sock.set_tcp_nodelay(tcp.nodelay)
            .map_err(refused("tcp.nodelay", || tcp.nodelay.to_string()))?;
    }
    if !needs.probes {
        return Ok(());
    }
    match tcp.keepalive_idle {
        Some(idle) => {
            let ka = TcpKeepalive::new()
                .with_time(idle)
                .with_interval(tcp.keepalive_interval)
                .with_retries(tcp.keepalive_count);
            // One call on the connect path; only a failure pays to find the culprit.
            if let Err(e) = sock.set_tcp_keepalive(&ka) {
                return Err(keepalive_culprit(&sock, tcp, idle, e));
            }
        }
        None if needs.offs => sock
            .set_keepalive(false)
            .map_err(refused("tcp.keepalive_idle", || "0s".into()))?,
        None => {}
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if needs.offs || tcp.user_timeout.is_some() {
        sock.set_tcp_user_timeout(tcp.user_timeout)
            .map_err(refused("tcp.user_timeout", || {
                tcp.user_timeout.map_or("0s".into(), secs)
            }))?;
    }
    Ok(())
}

/// Sets the keepalive options one at a time to name the one the kernel refuses.
fn keepalive_culprit(
    sock: &SockRef<'_>,
    tcp: &TcpConfig,
    idle: Duration,
    e: io::Error,
) -> SockoptError {
    let tries = [
        (
            "tcp.keepalive_idle",
            secs(idle),
            TcpKeepalive::new().with_time(idle),
        ),
        (
            "tcp.keepalive_interval",
            secs(tcp.keepalive_interval),
            TcpKeepalive::new().with_interval(tcp.keepalive_interval),
        ),
        (
            "tcp.keepalive_count",
            tcp.keepalive_count.to_string(),
            TcpKeepalive::new().with_retries(tcp.keepalive_count),
        ),
    ];
    for (option, value, ka) in tries {
        if let Err(source) = sock.set_tcp_keepalive(&ka) {
            return SockoptError {
                option,
                value,
                source,
            };
        }
    }
    SockoptError {
        option: "tcp.keepalive_*",
        value: format!(
            "{} / {} / {}",
            secs(idle),
            secs(tcp.keepalive_interval),
            tcp.keepalive_count
        ),
        source: e,
    }
}

/// Tries the `[tcp]` options on a throwaway socket of each address family, so a config the
/// kernel would refuse is refused before anything is bound or applied, rather than failing
/// every backend connect after a reload said yes.
pub fn probe(tcp: &TcpConfig) -> Result<(), SockoptError> {
    for domain in [Domain::IPV4, Domain::IPV6] {
        // No socket of a family (IPv6 off): nothing will use the options on it either.
        if let Ok(sock) = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) {
            apply(SockRef::from(&sock), tcp)?;
        }
    }
    Ok(())
}

/// Binds a listening socket with the configured backlog and options.
pub fn listen(addr: SocketAddr, tcp: &TcpConfig) -> io::Result<TcpListener> {
    TcpListener::from_std(listen_std(addr, tcp, false)?)
}

/// As [`listen`]; with `reuse_port`, `SO_REUSEPORT`, so each worker thread can bind a
/// socket of its own on the same address and the kernel spreads new connections over them
/// (`crate::listener::sibling`). Another process may then bind the address too, if it runs
/// as the same user and asks for `SO_REUSEPORT` as well (HAProxy and Envoy set it by
/// default); a socket bound without it still gets `EADDRINUSE`. [`refuse_if_taken`] first
/// keeps halfguard from joining a group it did not start.
pub fn listen_std(
    addr: SocketAddr,
    tcp: &TcpConfig,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; the guard keys
        // them as IPv4 (SourceKey canonicalises).
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    apply(SockRef::from(&sock), tcp)?;
    // Inherited by every accepted socket: bounds what is queued toward a client that stops
    // reading, at no cost per connection.
    if tcp.notsent_lowat > 0 {
        notsent_lowat(&sock, tcp.notsent_lowat)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(tcp.backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock.into())
}

/// Fails with `EADDRINUSE` when something already listens on `addr`, as a plain bind
/// would: binding with `SO_REUSEPORT` would instead join the group of another process that
/// set it too (a second halfguard, HAProxy) and split the connections with it. Port 0
/// always gets a fresh port, so there is nothing to ask.
pub fn refuse_if_taken(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(false)?;
    }
    probe.bind(&addr.into())
}

/// The kernel's identity of a socket (`SO_COOKIE`): the same through every copy of its
/// descriptor, and never given to another socket; `None` where the kernel has none.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn cookie(s: &impl std::os::fd::AsRawFd) -> Option<u64> {
    /// `include/uapi/asm-generic/socket.h`.
    const SO_COOKIE: libc::c_int = 57;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local; the fd is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

#[cfg(not(target_os = "linux"))]
pub fn cookie(_s: &impl std::os::fd::AsRawFd) -> Option<u64> {
    None
}

/// Sets `TCP_NOTSENT_LOWAT`: the kernel takes no more unsent bytes than this.
#[cfg(target_os = "linux")]
fn notsent_lowat(sock: &Socket, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    tcp_int(sock.as_raw_fd(), libc::TCP_NOTSENT_LOWAT, bytes)
}

/// Sets an integer `IPPROTO_TCP` option that socket2 has no setter for.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn tcp_int(fd: std::os::fd::RawFd, opt: libc::c_int, value: u32) -> io::Result<()> {
    let v: libc::c_int = value.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: setsockopt reads one c_int from a pointer to a live local; the caller borrows
    // the fd from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn notsent_lowat(_sock: &Socket, _bytes: u32) -> io::Result<()> {
    Ok(())
}

/// Connects to a backend. On loopback and most local links the kernel completes the
/// handshake inside connect() itself; the stream is then used at once, not after a trip
/// through the event loop for a writability event that says what is already known.
pub async fn connect(addr: SocketAddr, tcp: &TcpConfig) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    apply_fresh(SockRef::from(&sock), tcp, addr)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // A refused or unreachable connect is reported by getpeername's ENOTCONN, then the
    // writability event and SO_ERROR say why.
    let connected = sock.peer_addr().is_ok();
    let stream = TcpStream::from_std(sock.into())?;
    if connected {
        return Ok(stream);
    }
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.peer_addr()?;
    Ok(stream)
}

/// Asks the kernel to hand over accepted connections only once their first bytes arrived
/// (TCP_DEFER_ACCEPT), waiting at most about `secs` for them. A connection that never sends
/// stays in the kernel meanwhile, and what accept() returns can be looked at at once.
#[cfg(target_os = "linux")]
pub fn defer_accept(l: &TcpListener, secs: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    tcp_int(l.as_raw_fd(), libc::TCP_DEFER_ACCEPT, secs)
}

#[cfg(not(target_os = "linux"))]
pub fn defer_accept(_l: &TcpListener, _secs: u32) -> io::Result<()> {
    Ok(())
}

/// Copies the bytes already received on `s` into `buf` without consuming them, without
/// waiting: 0 when nothing has arrived yet (or the peer closed).
pub fn peek_now(s: &TcpStream, buf: &mut [u8]) -> usize {
    peek(s, buf).unwrap_or(0)
}

/// The bytes received on `s` so far, not taken, without waiting: `Ok(0)` only when the peer
/// closed with nothing unread, `WouldBlock` when nothing has arrived.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn peek(s: &impl std::os::fd::AsFd, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: recv writes at most buf.len() bytes into buf, which we own; the fd is borrowed
    // from a live stream.
    let n = unsafe {
        libc::recv(
            s.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether `l` was bound with `SO_REUSEPORT` (a caller's socket may not be).
#[cfg(unix)]
pub fn reuses_port(l: &impl std::os::fd::AsFd) -> bool {
    SockRef::from(l).reuse_port().unwrap_or(false)
}

#[cfg(not(unix))]
pub fn reuses_port<T>(_l: &T) -> bool {
    false
}

/// Makes the next close() send RST and skip FIN_WAIT/TIME_WAIT. Errors are ignored: the
/// socket is being thrown away either way.
pub fn abort(s: &impl std::os::fd::AsFd) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// One accept(2) on a non-blocking listening socket, outside tokio: the socket comes back
/// non-blocking and close-on-exec but not registered with the reactor, so a refusal costs
/// accept, setsockopt and close and nothing else (no epoll_ctl in and out, no allocation).
/// `WouldBlock` when the queue is empty.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn accept(l: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    // SAFETY: accept4 writes at most `*len` bytes of address into the zeroed storage
    // socket2 hands us, and sets `*len`; the listening fd is borrowed from a live listener.
    let (fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                l.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })?
    };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let (fd, addr) = {
        let (s, a) = SockRef::from(l).accept()?;
        s.set_nonblocking(true)?;
        (std::os::fd::IntoRawFd::into_raw_fd(s), a)
    };
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    // A TCP listener's peer is always an IPv4 or IPv6 address.
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((stream, peer))
}

/// Bytes in the kernel send queue not yet acknowledged by the peer (SIOCOUTQ). When this
/// shrinks the peer is taking our bytes, however slowly: progress, not a stall.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn unacked(s: &TcpStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one c_int through the pointer, which points to
    // a live local; the fd is borrowed from a live TcpStream.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n.max(0) as u32)
}

#[cfg(not(target_os = "linux"))]
pub fn unacked(_s: &TcpStream) -> Option<u32> {
    None
}

/// Bytes received on `s` and not yet read (FIONREAD): what a backend sent that halfguard
/// holds for a client that does not take it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn unread(s: &TcpStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points to a live local;
    // the fd is borrowed from a live TcpStream.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n.max(0) as u32)
}

#[cfg(not(target_os = "linux"))]
pub fn unread(_s: &TcpStream) -> Option<u32> {
    None
}

/// The soft open-files limit.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn nofile() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(r.rlim_cur as u64)
}

/// Raises the soft open-files limit to the hard one and returns the new soft limit.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn raise_nofile() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(io::Error::last_os_error());
            }
            r.rlim_cur = r.rlim_max;
        }
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(r.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop hands an admitted socket to tokio as it comes from `accept`, and
    /// keys its guard on the peer: it must be non-blocking (tokio would block a worker
    /// otherwise), close-on-exec, and carry the client's address; an empty queue is
    /// `WouldBlock`, which ends a batch.
    #[test]
    fn accept_gives_a_non_blocking_close_on_exec_socket_and_its_peer() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        assert_eq!(accept(&l).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = accept(&l).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let fd = s.as_raw_fd();
        // SAFETY: fcntl reads the flags of a live descriptor we own.
        #[allow(unsafe_code)]
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0, "non-blocking");
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "close-on-exec");
    }

    #[test]
    fn an_option_the_kernel_refuses_is_named_by_its_key() {
        let ka = TcpConfig {
            keepalive_idle: Some(Duration::from_secs(30)),
            ..TcpConfig::default()
        };
        for (key, tcp) in [
            (
                "tcp.keepalive_idle",
                TcpConfig {
                    keepalive_idle: Some(Duration::from_secs(40_000)),
                    ..ka.clone()
                },
            ),
            (
                "tcp.keepalive_interval",
                TcpConfig {
                    keepalive_interval: Duration::from_secs(40_000),
                    ..ka.clone()
                },
            ),
            (
                "tcp.keepalive_count",
                TcpConfig {
                    keepalive_count: 128,
                    ..ka.clone()
                },
            ),
        ] {
            let e = probe(&tcp).expect_err(key);
            assert_eq!(e.option, key, "{e}");
        }
        probe(&ka).expect("the defaults are taken");
    }

    #[test]
    fn a_backend_socket_pays_only_for_what_its_peer_can_use() {
        let tcp = TcpConfig {
            nodelay: true,
            keepalive_idle: Some(Duration::from_secs(7)),
            user_timeout: Some(Duration::from_millis(1500)),
            ..TcpConfig::default()
        };
        let fresh = || Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        // A remote backend (no traffic: the socket is never connected) gets the dead-peer
        // probes; a loopback one only TCP_NODELAY.
        let remote = fresh();
        apply_fresh(
            SockRef::from(&remote),
            &tcp,
            "198.18.0.1:80".parse().unwrap(),
        )
        .unwrap();
        assert!(remote.tcp_nodelay().unwrap());
        assert!(remote.keepalive().unwrap());
        assert_eq!(remote.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            remote.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
        for local in ["127.0.0.1:80", "[::1]:80", "[::ffff:127.0.0.1]:80"] {
            let s = fresh();
            apply_fresh(SockRef::from(&s), &tcp, local.parse().unwrap()).unwrap();
            assert!(s.tcp_nodelay().unwrap(), "{local}");
            assert!(!s.keepalive().unwrap(), "{local}");
            assert_eq!(s.tcp_user_timeout().unwrap(), None, "{local}");
        }
        // A refused value is still named by its key.
        let bad = TcpConfig {
            keepalive_idle: Some(Duration::from_secs(40_000)),
            ..tcp
        };
        let e = apply_fresh(
            SockRef::from(&fresh()),
            &bad,
            "198.18.0.1:80".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.option, "tcp.keepalive_idle");
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let tcp = TcpConfig {
            nodelay: true,
            keepalive_idle: Some(Duration::from_secs(7)),
            keepalive_interval: Duration::from_secs(3),
            keepalive_count: 4,
            user_timeout: Some(Duration::from_millis(1500)),
            ..TcpConfig::default()
        };
        let l = listen("127.0.0.1:0".parse().unwrap(), &tcp).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let r = SockRef::from(&s);
        assert!(r.tcp_nodelay().unwrap());
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            r.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
    }
}
