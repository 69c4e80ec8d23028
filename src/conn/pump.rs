//! The two-way pump: bytes both ways, half-close forwarded exactly, progress recorded.
//!
//! Why not `tokio::io::copy_bidirectional`: it has no clock for a direction that lingers
//! after the other side's FIN, and it loses its byte counts on error. This pump copies each
//! direction with readiness + `try_read`/`try_write` on shared `&TcpStream`s, so both
//! directions run in the connection's one task with no split and no extra allocation, and
//! it reports each FIN as an event so the connection can change state.
//!
//! A direction holds a copy buffer only while bytes move: it is allocated on the first
//! readable event and freed when the direction is drained and waits again, so a silent or
//! idle connection costs no buffer.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::SLOW_READER_WINDOW;

/// Copy buffer per direction while bytes move.
pub const BUF_SIZE: usize = 16 * 1024;
/// A spliced direction whose destination kept it waiting this long gives its pipe (256 KiB of
/// kernel memory and two descriptors) back once the pipe is empty: a slow reader does not
/// need zero copy, and the pipe budget is for bulk.
#[cfg(target_os = "linux")]
const SLOW_FOR_A_PIPE: std::time::Duration = std::time::Duration::from_secs(1);
/// Free copy buffers kept per worker thread, so a request/response exchange reuses one
/// instead of going to the allocator twice per message.
const POOLED_BUFS: usize = 64;

thread_local! {
    static BUFS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    BUFS.with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    BUFS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOLED_BUFS {
            b.push(buf);
        }
    });
}

/// What the kernel send queues say when a clock runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelQueues {
    /// Nothing in flight: the clock may end the connection.
    Empty,
    /// Bytes in flight, looked at for less than the window so far: look again.
    Watching,
    /// Bytes in flight, and at least `min_rate` acknowledged over the window: progress.
    Moving,
    /// Bytes in flight, less than `min_rate` acknowledged over a whole window: stalled.
    Stuck,
}

/// One look at the kernel send queues (client, server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Look {
    at: Instant,
    queues: [Option<u32>; 2],
}

/// Looks kept: a window's worth at one a second, and the one before it. A bound, so that a
/// task that looks more often than that cannot grow the list.
const MAX_LOOKS: usize = 2 + (SLOW_READER_WINDOW.as_secs() as usize);

/// What the looks since a clock ran out (oldest first, the last one now) say about the
/// peers' drain over `window`: a queue that was acknowledged at least `min_rate` bytes per
/// second (and at least a byte) over the looks is moving. Bytes are summed over each pair of
/// looks, so a reader that takes a burst now and then counts in full, and a queue that grew
/// (we wrote more) counts nothing for that step. Until the looks span a window, a queue that
/// has not drained a window's worth yet is only watched: a slow link acknowledges in bursts,
/// and a second with nothing acknowledged says nothing about it.
fn judge(looks: &[Look], window: std::time::Duration, min_rate: u32) -> KernelQueues {
    let Some(last) = looks.last() else {
        return KernelQueues::Empty;
    };
    if !last.queues.iter().any(|n| matches!(n, Some(q) if *q > 0)) {
        return KernelQueues::Empty;
    }
    let span = last.at.saturating_duration_since(looks[0].at).max(window);
    let floor = (f64::from(min_rate) * span.as_secs_f64()).max(1.0) as u64;
    let drained = |side: usize| -> u64 {
        looks
            .windows(2)
            .map(|w| match (w[0].queues[side], w[1].queues[side]) {
                (Some(b), Some(n)) => u64::from(b.saturating_sub(n)),
                _ => 0,
            })
            .sum()
    };
    if (0..2).any(|side| last.queues[side].is_some_and(|q| q > 0) && drained(side) >= floor) {
        KernelQueues::Moving
    } else if last.at.saturating_duration_since(looks[0].at) < window {
        KernelQueues::Watching
    } else {
        KernelQueues::Stuck
    }
}

/// Who sent a FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// What the pump reports; progress is recorded, not reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `Side` sent FIN and it was forwarded (`shutdown(Write)` toward the other side).
    HalfClosed(Side),
    /// Both directions ended with FIN: a clean close.
    Closed,
    /// Bytes started waiting for a peer that takes none: the write-stall clock starts.
    Stalled,
    /// The first exchange completed: the client spoke and the server answered. Once.
    Exchanged,
}

/// A direction's FIN: not yet read, read (to forward once the bytes before it are
/// written), forwarded (the direction is over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fin {
    Open,
    Read,
    Forwarded,
}

/// Whether a copying direction switches to splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Splice {
    /// Never: splice is off, or the destination proved a slow reader (a pipe would sit full).
    Off,
    /// When it proves bulk.
    Ready,
    /// Its reads filled the whole buffer: splice when the buffer is next empty.
    Bulk,
}

/// One direction: read from one socket, write to the other.
#[derive(Debug)]
struct Direction<'a> {
    /// The listener's byte counter for this direction, added to as bytes are written.
    counter: &'a AtomicU64,
    /// Whose socket this direction reads.
    from: Side,
    buf: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
    /// How far the source's FIN has come.
    fin: Fin,
    /// Last time a byte was read or written in this direction.
    last_progress: Instant,
    /// Bytes written in this direction, for the progress-rate check.
    total: u64,
    /// The current burst of reads (bytes read with no pause of `BURST_GAP` or more): when it
    /// began, how many bytes it holds, and the last read. The request clock judges the
    /// client's burst before the backend's first byte.
    burst: Option<Burst>,
    /// Since when bytes wait for a destination that takes none, if they do.
    stalled_since: Option<Instant>,
    /// A stall began and the connection has not been told yet.
    stall_started: bool,
    /// Whether this direction may switch to splice, and whether it proved bulk.
    splice: Splice,
    /// The client's direction of an HTTP/1 connection: each burst is looked at for a
    /// request line, so that the request clock judges every request, not only the first.
    judge_requests: bool,
    /// When the current burst began, if it began with a request line.
    request_start: Option<Instant>,
    /// The current burst's first bytes while too few to tell whether they begin a request
    /// (a method dripped a byte at a time). Boxed: most bursts tell at their first read.
    head: Option<Box<Head>>,
    /// The listener's count of directions that switched to splice.
    spliced: &'a AtomicU64,
    /// No readiness event has been seen yet on this direction's sockets, though they are
    /// known to be ready (the client spoke; the backend connect completed at once): the
    /// first read and the first write go straight to the kernel instead of waiting a turn of
    /// the event loop for what is already known.
    fresh_read: bool,
    fresh_write: bool,
    /// Splicing: the pipe, and how many bytes sit in it.
    #[cfg(target_os = "linux")]
    pipe: Option<crate::splice::Pipe>,
    in_pipe: usize,
}

impl Drop for Direction<'_> {
    fn drop(&mut self) {
        self.release_buf();
        // An empty pipe goes back for the next bulk connection; one that may hold bytes
        // (an aborted transfer) is closed.
        #[cfg(target_os = "linux")]
        if let Some(p) = self.pipe.take()
            && self.in_pipe == 0
        {
            p.put_back();
        }
    }
}

impl<'a> Direction<'a> {
    fn new(
        now: Instant,
        counter: &'a AtomicU64,
        spliced: &'a AtomicU64,
        from: Side,
        may_splice: bool,
    ) -> Direction<'a> {
        let fresh = from == Side::Client;
        Direction {
            fresh_read: fresh,
            fresh_write: fresh,
            splice: if may_splice {
                Splice::Ready
            } else {
                Splice::Off
            },
            spliced,
            #[cfg(target_os = "linux")]
            pipe: None,
            in_pipe: 0,
            counter,
            from,
            judge_requests: false,
            request_start: None,
            head: None,
            buf: None,
            pos: 0,
            len: 0,
            fin: Fin::Open,
            last_progress: now,
            total: 0,
            burst: None,
            stalled_since: None,
            stall_started: false,
        }
    }

    /// A byte has been written in this direction.
    fn moved(&self) -> bool {
        self.total > 0
    }

    /// The source's FIN has been read.
    fn eof(&self) -> bool {
        self.fin != Fin::Open
    }

    /// The FIN has been forwarded: the direction is over.
    fn done(&self) -> bool {
        self.fin == Fin::Forwarded
    }

    /// Forwards the source's FIN exactly: `shutdown(Write)` toward the other side, whose
    /// direction keeps flowing. When that other direction is already over (`other_done`),
    /// the close that follows sends the FIN, so the call is saved.
    fn forward_fin(&mut self, to: &TcpStream, other_done: bool) -> io::Result<()> {
        if !other_done {
            SockRef::from(to).shutdown(Shutdown::Write)?;
        }
        self.fin = Fin::Forwarded;
        Ok(())
    }

    fn release_buf(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
    }

    /// Bytes wait for a destination that is full: the write-stall clock starts, once.
    fn waiting_to_write(&mut self) {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            self.stall_started = true;
        }
    }

    /// `n` bytes reached the destination at `now`: progress, and no stall.
    fn wrote(&mut self, n: usize, now: Instant) {
        self.total += n as u64;
        self.counter.fetch_add(n as u64, Relaxed);
        self.last_progress = now;
        self.stalled_since = None;
    }

    /// `n` bytes were read from the source at `now`: progress, and the burst grows (or a
    /// new one starts after a pause; on HTTP/1, also after the server's answer: see
    /// [`Pump::poll_event`]).
    fn read(last_progress: &mut Instant, burst: &mut Option<Burst>, n: usize, now: Instant) {
        *last_progress = now;
        match burst {
            Some(b) if now.saturating_duration_since(b.last) < BURST_GAP => {
                b.bytes += n as u64;
                b.last = now;
            }
            _ => {
                *burst = Some(Burst {
                    start: now,
                    bytes: n as u64,
                    last: now,
                });
            }
        }
    }

    /// Copies until `from` would block, `to` would block, or EOF has been forwarded
    /// (`Ready(Ok)`), or an error, which says whose socket failed. `other_done`: the other
    /// direction is over (its FIN forwarded), so this one's FIN goes with the close.
    fn poll_copy(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        other_done: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        let (rd, wr) = (self.from, self.from.other());
        let at = |side: Side| move |error: io::Error| PumpError { side, error };
        #[cfg(target_os = "linux")]
        if self.pipe.is_some() {
            return self.poll_splice(from, to, other_done, cx);
        }
        // The progress stamps of one call, read once at its first byte: its reads and writes
        // are microseconds apart, and a clock read for each was two per request and
        // direction of a keep-alive connection.
        let mut now: Option<Instant> = None;
        loop {
            if self.pos < self.len {
                let Some(buf) = self.buf.as_deref() else {
                    return Poll::Ready(Err(at(wr)(io::Error::other("pump buffer lost"))));
                };
                let fresh = std::mem::take(&mut self.fresh_write);
                if !fresh && to.poll_write_ready(cx).map_err(at(wr))?.is_pending() {
                    self.waiting_to_write();
                    return Poll::Pending;
                }
                // When the source's EOF is already read, the FIN goes out right after this
                // write: MSG_MORE holds the bytes so the FIN leaves in the same segment
                // (one segment less per exchange, and one ACK less from the peer).
                let more = if self.eof() && !other_done {
                    libc::MSG_MORE
                } else {
                    0
                };
                let send = || {
                    SockRef::from(to)
                        .send_with_flags(&buf[self.pos..self.len], more | libc::MSG_NOSIGNAL)
                };
                // Fresh: no readiness event yet, so straight to the kernel, which says if it
                // would block (then the next turn waits for readiness).
                let wrote = if fresh {
                    send()
                } else {
                    to.try_io(Interest::WRITABLE, send)
                };
                match wrote {
                    Ok(n) => {
                        self.pos += n;
                        self.wrote(n, *now.get_or_insert_with(Instant::now));
                        if self.pos == self.len {
                            self.pos = 0;
                            self.len = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(at(wr)(e))),
                }
                continue;
            }
            // The buffer is empty: a bulk direction switches to splice here, if a pipe is
            // to be had.
            #[cfg(target_os = "linux")]
            if self.splice == Splice::Bulk && !self.eof() && !self.fresh_read {
                self.splice = Splice::Ready;
                if let Some(p) = crate::splice::Pipe::get() {
                    self.release_buf();
                    self.pipe = Some(p);
                    self.spliced.fetch_add(1, Relaxed);
                    return self.poll_splice(from, to, other_done, cx);
                }
            }
            if self.eof() {
                self.forward_fin(to, other_done).map_err(at(wr))?;
                self.release_buf();
                return Poll::Ready(Ok(()));
            }
            let fresh = std::mem::take(&mut self.fresh_read);
            if !fresh && from.poll_read_ready(cx).map_err(at(rd))?.is_pending() {
                // Drained and waiting: give the buffer back.
                self.release_buf();
                return Poll::Pending;
            }
            let buf = self.buf.get_or_insert_with(take_buf);
            // A read that did not fill the buffer emptied the receive queue: readiness is
            // cleared then (as tokio's own `poll_read` does), so the read on below costs no
            // call unless more came or a FIN is pending (a closed state is never cleared).
            // The clear uses the readiness seen before the read: bytes that arrive during it
            // leave the socket ready.
            let mut tried = false;
            let mut got = 0;
            let cap = buf.len();
            let read = match from.try_io(Interest::READABLE, || {
                tried = true;
                got = io::Read::read(&mut &*SockRef::from(from), &mut buf[..])?;
                if 0 < got && got < cap {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(got)
                }
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
                // No readiness event yet on a fresh socket, but the bytes are there:
                // straight to the kernel. And on until the kernel says it has no more: the
                // first message was looked at while held (`conn::holding`), which cleared
                // the readiness, and a full receive queue brings no new event until enough
                // is read to reopen the client's window.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && fresh && !tried => {
                    let r = io::Read::read(&mut &*SockRef::from(from), buf);
                    // A read short of the buffer emptied the queue: bytes that come later
                    // bring their own event.
                    if matches!(r, Ok(n) if n == cap) {
                        self.fresh_read = true;
                    }
                    r
                }
                r => r,
            };
            match read {
                Ok(0) => self.fin = Fin::Read,
                Ok(n) => {
                    self.len = n;
                    let at = *now.get_or_insert_with(Instant::now);
                    Self::read(&mut self.last_progress, &mut self.burst, n, at);
                    if self.judge_requests
                        && let Some(b) = &self.burst
                    {
                        if b.bytes == n as u64 {
                            self.request_start = None;
                            self.head = None;
                            match crate::first_message::starts_request(&buf[..n]) {
                                Some(is) => self.request_start = is.then_some(b.start),
                                None => self.head = Some(Box::default()),
                            }
                        }
                        if let Some(h) = &mut self.head
                            && let Some(is) = h.judge(&buf[..n])
                        {
                            self.head = None;
                            self.request_start = is.then_some(b.start);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(at(rd)(e))),
            }
            // Read on until the source would block before writing: the read that says
            // "would block" is made either way, and made first it also finds a FIN that came
            // with the data, so the write can carry it (MSG_MORE above).
            while 0 < self.len && self.len < BUF_SIZE && self.fin == Fin::Open {
                match from.try_read(&mut buf[self.len..]) {
                    Ok(0) => self.fin = Fin::Read,
                    Ok(n) => {
                        if let Some(b) = &mut self.burst {
                            b.bytes += n as u64;
                            if let Some(h) = &mut self.head
                                && let Some(is) = h.judge(&buf[self.len..self.len + n])
                            {
                                self.head = None;
                                self.request_start = is.then_some(b.start);
                            }
                        }
                        self.len += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(at(rd)(e))),
                }
            }
            if self.len == BUF_SIZE && self.splice != Splice::Off {
                self.splice = Splice::Bulk;
            }
        }
    }

    /// The splice path: socket -> pipe -> socket, same progress and stall bookkeeping.
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        other_done: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        use crate::splice::{PIPE_SIZE, splice};
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;
        let (rd, wr) = (self.from, self.from.other());
        let at = |side: Side| move |error: io::Error| PumpError { side, error };
        // Raw ends: the pipe stays in `self.pipe` for as long as this runs.
        let Some((pipe_r, pipe_w)) = self.pipe.as_ref().map(crate::splice::Pipe::fds) else {
            return Poll::Ready(Err(at(wr)(io::Error::other("pump pipe lost"))));
        };
        let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
        loop {
            if self.in_pipe > 0 {
                if to.poll_write_ready(cx).map_err(at(wr))?.is_pending() {
                    self.waiting_to_write();
                    return Poll::Pending;
                }
                let len = self.in_pipe;
                match to.try_io(Interest::WRITABLE, || splice(pipe_r, to_fd, len)) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        // A destination that kept us waiting this long is a slow reader:
                        // once the pipe is empty, it goes back and the direction copies
                        // through the small buffer (see below).
                        if self
                            .stalled_since
                            .is_some_and(|s| s.elapsed() >= SLOW_FOR_A_PIPE)
                        {
                            self.splice = Splice::Off;
                        }
                        self.wrote(n, Instant::now());
                        if self.in_pipe == 0
                            && self.splice == Splice::Off
                            && let Some(p) = self.pipe.take()
                        {
                            p.put_back();
                            return self.poll_copy(from, to, other_done, cx);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(at(wr)(e))),
                }
                continue;
            }
            if self.eof() {
                self.forward_fin(to, other_done).map_err(at(wr))?;
                return Poll::Ready(Ok(()));
            }
            if from.poll_read_ready(cx).map_err(at(rd))?.is_pending() {
                return Poll::Pending;
            }
            match from.try_io(Interest::READABLE, || splice(from_fd, pipe_w, PIPE_SIZE)) {
                Ok(0) => self.fin = Fin::Read,
                Ok(n) => {
                    self.in_pipe = n;
                    Self::read(&mut self.last_progress, &mut self.burst, n, Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(at(rd)(e))),
            }
        }
    }
}

/// The first bytes of a client's burst, kept until they tell whether it begins a request.
#[derive(Debug, Default)]
struct Head {
    bytes: [u8; crate::first_message::REQUEST_PREFIX],
    len: u8,
}

impl Head {
    /// Adds the bytes just read: `Some(true)` once they begin a request, `Some(false)` once
    /// they cannot, `None` while too few to tell.
    fn judge(&mut self, read: &[u8]) -> Option<bool> {
        let len = usize::from(self.len);
        let take = read.len().min(self.bytes.len() - len);
        self.bytes[len..len + take].copy_from_slice(&read[..take]);
        self.len += take as u8;
        crate::first_message::starts_request(&self.bytes[..len + take])
    }
}

/// A pause in a direction's reads this long ends its burst: the sender has said what it had
/// to say and waits. A drip sends more often than this; a heartbeat less often.
pub const BURST_GAP: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads with no pause of [`BURST_GAP`] or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Burst {
    pub start: Instant,
    pub bytes: u64,
    pub last: Instant,
}

/// A read or write failed (a reset, or a kernel timeout) on `side`'s socket.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} socket: {error}")]
pub struct PumpError {
    pub side: Side,
    #[source]
    pub error: io::Error,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// What a pump's progress comes to when its connection parks idle (`conn::parked`), kept
/// in the lot's record and given back to the pump of the task that wakes it: the idle clock
/// runs from the last byte, not from the wake, and a byte moved either way stays moved (the
/// exchange is not reported twice, a server reset is not taken for an early one).
#[derive(Clone, Copy, Debug)]
pub struct Stamps {
    /// The last byte read or written, client to server and server to client.
    pub up_last: Instant,
    pub down_last: Instant,
    /// Bytes written each way.
    pub up_total: u64,
    pub down_total: u64,
    /// The client's requests are HTTP/1 (every request clocked).
    pub http1: bool,
}

impl Stamps {
    /// The last time a byte moved either way.
    pub fn last_activity(&self) -> Instant {
        self.up_last.max(self.down_last)
    }
}

/// Both directions of one proxied connection.
#[derive(Debug)]
pub struct Pump<'a> {
    client: &'a TcpStream,
    server: &'a TcpStream,
    up: Direction<'a>,
    down: Direction<'a>,
    /// The kernel send queues seen at the looks since a clock ran out, oldest first: at most
    /// a window's worth and the look before it. Empty (and unallocated) until a clock runs
    /// out with bytes in flight.
    looks: std::collections::VecDeque<Look>,
    /// The client's bytes are left in its socket until then (see [`Pump::hold_client`]).
    hold: Option<Hold>,
    /// [`Event::Exchanged`] was reported.
    exchanged: bool,
}

/// Reads from the client wait: one pass drains what the kernel holds, then none until
/// `until`, unless that pass moved `enough` bytes to show the client is moving again.
#[derive(Clone, Copy, Debug)]
struct Hold {
    until: Instant,
    enough: u64,
    /// The draining pass is over.
    drained: bool,
    /// The client's bytes forwarded when the hold began.
    before: u64,
    /// The server's bytes forwarded when the hold began: any more, and the request is over.
    server_before: u64,
}

impl<'a> Pump<'a> {
    /// Bytes are counted in `stats` as they are written, so long transfers show up in
    /// metrics while they run. With `splice`, a direction that proves to be bulk moves its
    /// bytes with splice(2) while the pipe budget allows.
    /// `http1`: the first message was an HTTP/1 request head, so later requests are
    /// recognised too (see [`Pump::request_burst`]).
    pub fn new(
        client: &'a TcpStream,
        server: &'a TcpStream,
        stats: &'a crate::stats::Stats,
        splice: bool,
        http1: bool,
    ) -> Pump<'a> {
        let now = Instant::now();
        let spliced = &stats.spliced;
        let mut up = Direction::new(now, &stats.bytes_upstream, spliced, Side::Client, splice);
        up.judge_requests = http1;
        Pump {
            client,
            server,
            up,
            down: Direction::new(now, &stats.bytes_downstream, spliced, Side::Server, splice),
            looks: std::collections::VecDeque::new(),
            hold: None,
            exchanged: false,
        }
    }

    /// The progress of a pump that parked: where a woken connection's pump starts.
    pub fn restore(&mut self, s: &Stamps) {
        (self.up.last_progress, self.up.total) = (s.up_last, s.up_total);
        (self.down.last_progress, self.down.total) = (s.down_last, s.down_total);
        self.exchanged = self.up.moved() && self.down.moved();
    }

    /// Whether nothing is outstanding, so the connection may leave its task and park: no
    /// FIN read, no byte in a buffer or a pipe, none waiting for a peer, no hold on the
    /// client, no kernel-queue look running, no request open (the request clock judges
    /// none) and none unanswered. Then the pump's state is its [`Stamps`].
    pub fn parkable(&self) -> Option<Stamps> {
        let quiet = |d: &Direction<'_>| {
            d.fin == Fin::Open && d.len == d.pos && d.in_pipe == 0 && d.stalled_since.is_none()
        };
        let idle = quiet(&self.up)
            && quiet(&self.down)
            && self.hold.is_none()
            && self.looks.is_empty()
            && self.request_burst().is_none()
            && !self.awaits_answer();
        idle.then_some(Stamps {
            up_last: self.up.last_progress,
            down_last: self.down.last_progress,
            up_total: self.up.total,
            down_total: self.down.total,
            http1: self.up.judge_requests,
        })
    }

    /// Leaves the client's bytes in its socket until `until`, after one pass that drains and
    /// forwards what is there now. A client that trickles a byte at a time before the
    /// backend's first byte costs a wake-up, a read and a write (and the backend as much) per
    /// byte; held, its bytes wait in the kernel and go on in one write per hold. The pass
    /// that finds `enough` bytes (the client moves at the rate again) lifts the hold at once.
    pub fn hold_client(&mut self, until: Instant, enough: u64) {
        self.hold = Some(Hold {
            until,
            enough,
            drained: false,
            before: self.up.total,
            server_before: self.down.total,
        });
    }

    /// Whether the client's reads skip this turn: held, drained, nothing of the client's
    /// still on its way to the server. The request is over once the server says anything
    /// (a byte or its FIN): the hold ends then.
    fn client_held(&mut self) -> bool {
        let Some(h) = self.hold else {
            return false;
        };
        if self.server_answered(&h) {
            self.hold = None;
            return false;
        }
        if !h.drained || self.up.pos < self.up.len || self.up.in_pipe > 0 {
            return false;
        }
        if Instant::now() < h.until {
            return true;
        }
        self.hold = None;
        false
    }

    /// Moves bytes until something the connection must act on happens. Cancel-safe: all
    /// state lives in the pump, so it can sit in a `select!` and be polled again.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, PumpError>> {
        // The server spoke since the client's last read: the client's next bytes begin a
        // new burst (its next request), however soon after the answer they come.
        if self.up.judge_requests
            && let Some(b) = self.up.burst
            && b.last < self.down.last_progress
        {
            self.up.burst = None;
        }
        if !self.up.done() && !self.client_held() {
            if (self.up)
                .poll_copy(self.client, self.server, self.down.done(), cx)?
                .is_ready()
            {
                return Poll::Ready(Ok(self.closed_or(Side::Client)));
            }
            // The draining pass of a hold is over: hold, or lift it if the client moves.
            if let Some(h) = &mut self.hold
                && !h.drained
            {
                h.drained = true;
                if self.up.total - h.before >= h.enough {
                    self.hold = None;
                }
            }
        }
        if !self.down.done()
            && self
                .down
                .poll_copy(self.server, self.client, self.up.done(), cx)?
                .is_ready()
        {
            return Poll::Ready(Ok(self.closed_or(Side::Server)));
        }
        // The server spoke while the client was held: the hold is over, and the task comes
        // back at once to read what the client said meanwhile (nothing else would wake it:
        // its reads registered no waker, and a connection past its request no longer checks
        // its progress on a clock).
        if self.hold.is_some_and(|h| self.server_answered(&h)) {
            self.hold = None;
            cx.waker().wake_by_ref();
        }
        // Both directions wait (their wakers are registered). Progress only ever pushes a
        // clock back, so it is read lazily; a stall pulls one forward, so it is reported.
        if std::mem::take(&mut self.up.stall_started) | std::mem::take(&mut self.down.stall_started)
        {
            return Poll::Ready(Ok(Event::Stalled));
        }
        if !self.exchanged && self.up.moved() && self.down.moved() {
            self.exchanged = true;
            return Poll::Ready(Ok(Event::Exchanged));
        }
        Poll::Pending
    }

    /// The server said something (a byte or its FIN) since the hold began.
    fn server_answered(&self, h: &Hold) -> bool {
        self.down.total > h.server_before || self.down.eof()
    }

    fn closed_or(&self, side: Side) -> Event {
        if self.up.done() && self.down.done() {
            Event::Closed
        } else {
            Event::HalfClosed(side)
        }
    }

    /// The last time a byte moved either way.
    pub fn last_activity(&self) -> Instant {
        self.up.last_progress.max(self.down.last_progress)
    }

    /// The last time a byte moved in the direction still open after `closed` sent FIN.
    pub fn last_open_progress(&self, closed: Side) -> Instant {
        match closed {
            Side::Client => self.down.last_progress,
            Side::Server => self.up.last_progress,
        }
    }

    /// Forgets the send queues seen at earlier looks: the next look is a first look again.
    pub fn forget_looks(&mut self) {
        self.looks.clear();
    }

    /// The server has sent at least one byte to the client.
    pub fn server_spoke(&self) -> bool {
        self.down.moved()
    }

    /// The client's current request, as far as the request clock judges it: its burst
    /// while the server has said nothing yet, and on an HTTP/1 connection also a later
    /// burst that began with a request line after the server's last byte (a keep-alive
    /// connection's next request).
    pub fn request_burst(&self) -> Option<Burst> {
        let b = self.up.burst?;
        if !self.down.moved() {
            return Some(b);
        }
        (self.up.request_start == Some(b.start) && b.start >= self.down.last_progress).then_some(b)
    }

    /// The client socket's send queue now (one ioctl): what the two below are reckoned
    /// from, read once per look.
    pub fn client_send_queue(&self) -> u64 {
        u64::from(crate::sockopt::unacked(self.client).unwrap_or(0))
    }

    /// Bytes queued toward the client: its socket's send queue (`sent`), and what the
    /// server sent that waits unread in ours (one ioctl more).
    pub fn queued_toward_client(&self, sent: u64) -> u64 {
        let unread = crate::sockopt::unread(self.server).unwrap_or(0);
        sent + u64::from(unread) + (self.down.len - self.down.pos) as u64
    }

    /// The server's bytes the client has taken (acknowledged) so far, its send queue
    /// holding `sent`.
    pub fn delivered_to_client(&self, sent: u64) -> u64 {
        self.down.total.saturating_sub(sent)
    }

    /// The client's bytes forwarded so far.
    pub fn client_total(&self) -> u64 {
        self.up.total
    }

    /// Bytes moved both ways so far.
    pub fn total(&self) -> u64 {
        self.up.total + self.down.total
    }

    /// At least one byte of the client's has reached the server.
    pub fn client_spoke(&self) -> bool {
        self.up.moved()
    }

    /// The client's last byte came after the server's last: what it said is unanswered
    /// (a request the server works on, a long poll), unless it is still saying it.
    pub fn awaits_answer(&self) -> bool {
        self.up.moved() && (!self.down.moved() || self.up.last_progress > self.down.last_progress)
    }

    /// The server's bytes wait for a client that takes none: the client is the slow reader.
    pub fn client_reads_slowly(&self) -> bool {
        self.down.stalled_since.is_some()
    }

    /// Since when the client has not taken the server's bytes waiting for it.
    pub fn client_blocked_since(&self) -> Option<Instant> {
        self.down.stalled_since
    }

    /// Since when some direction has bytes for a peer that takes none.
    pub fn stalled_since(&self) -> Option<Instant> {
        match (self.up.stalled_since, self.down.stalled_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Looks at the kernel send queues, for a clock that ran out. A peer still taking our
    /// data at `min_rate` bytes per second or more over [`SLOW_READER_WINDOW`] is making
    /// progress, and an RST would discard those bytes; one that acknowledges a few bytes now
    /// and then is a slow reader holding a socket, and is stuck.
    pub fn kernel_progress(&mut self, min_rate: u32) -> KernelQueues {
        let look = Look {
            at: Instant::now(),
            queues: [
                crate::sockopt::unacked(self.client),
                crate::sockopt::unacked(self.server),
            ],
        };
        // Keep one look at or before the window's start, and no more than the bound.
        let start = look.at.checked_sub(SLOW_READER_WINDOW);
        while self.looks.len() >= MAX_LOOKS
            || (self.looks.len() >= 2 && start.is_some_and(|s| self.looks[1].at <= s))
        {
            self.looks.pop_front();
        }
        self.looks.push_back(look);
        judge(self.looks.make_contiguous(), SLOW_READER_WINDOW, min_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Looks a second apart from `t0`, client queue sizes as given, server queue empty.
    fn looks(t0: Instant, client: &[u32]) -> Vec<Look> {
        client
            .iter()
            .enumerate()
            .map(|(i, &c)| Look {
                at: t0 + Duration::from_secs(i as u64),
                queues: [Some(c), Some(0)],
            })
            .collect()
    }

    const W: Duration = Duration::from_secs(5);

    #[test]
    fn a_queue_is_judged_by_its_drain_over_a_whole_window() {
        let t0 = Instant::now();
        // Nothing in flight: nothing to wait for.
        assert_eq!(judge(&looks(t0, &[0]), W, 500), KernelQueues::Empty);
        assert_eq!(judge(&looks(t0, &[9000, 0]), W, 500), KernelQueues::Empty);
        // The first look, and looks that span less than the window: watched, not judged.
        assert_eq!(judge(&looks(t0, &[9000]), W, 500), KernelQueues::Watching);
        let still = [9000; 5];
        assert_eq!(judge(&looks(t0, &still), W, 500), KernelQueues::Watching);
        // A whole window with nothing acknowledged: stuck.
        assert_eq!(judge(&looks(t0, &[9000; 6]), W, 500), KernelQueues::Stuck);
        // A few bytes a second: it moves, but that is a socket held, not progress.
        let trickle = [9000, 8990, 8980, 8970, 8960, 8950];
        assert_eq!(judge(&looks(t0, &trickle), W, 500), KernelQueues::Stuck);
        // Queues that grew (we wrote more) are not a drain.
        let grew = [9000, 9500, 9500, 9500, 9500, 9500];
        assert_eq!(judge(&looks(t0, &grew), W, 500), KernelQueues::Stuck);
        // min_rate 0: any byte over the window counts.
        let one = [9000, 9000, 9000, 9000, 9000, 8999];
        assert_eq!(judge(&looks(t0, &one), W, 0), KernelQueues::Moving);
    }

    #[test]
    fn a_reader_that_takes_its_bytes_in_bursts_is_moving() {
        let t0 = Instant::now();
        // 2 kB/s in 4 kB bursts two seconds apart, nothing between: a whole second with
        // nothing acknowledged is common, the window holds 8 kB, four times min_rate.
        let bursts = [20000, 20000, 16000, 16000, 12000, 12000];
        assert_eq!(judge(&looks(t0, &bursts), W, 500), KernelQueues::Moving);
        // A window's worth at once counts before the window is over.
        let early = [20000, 17000];
        assert_eq!(judge(&looks(t0, &early), W, 500), KernelQueues::Moving);
        // Between bursts, within the window: watched.
        let between = [20000, 20000, 20000];
        assert_eq!(judge(&looks(t0, &between), W, 500), KernelQueues::Watching);
        // The server's queue moving is progress too.
        let mut server = looks(t0, &[9000; 6]);
        for (i, l) in server.iter_mut().enumerate() {
            l.queues[1] = Some(30000 - 1000 * i as u32);
        }
        assert_eq!(judge(&server, W, 500), KernelQueues::Moving);
    }
}
