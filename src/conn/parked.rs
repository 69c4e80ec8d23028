//! The parking lot: silent connections held outside any task until their first byte, and
//! open ones idle after an exchange until either side speaks.
//!
//! A connection that has said nothing costs what its task costs: tokio's cell around the
//! `serve` future (1,024 bytes), tokio's readiness record for its socket (256) and the
//! waiters of its silent wait, about 1,640 bytes in all, and a silent flood is made of
//! nothing else. Yet all a silent connection needs is its socket's readiness, one deadline
//! and its ticket, as nginx's idle connection is an event and a timer node. So a connection
//! that has not spoken by the time it is admitted (`conn::start` looks once) is parked
//! here as a [`Record`]: the socket, registered with the lot's own epoll set and not with
//! tokio, its ticket, when it was accepted and its next deadline.
//!
//! One lot per listener, one task each: the clocks, the pressure, the policy and the bell
//! are the listener's, so one task hears the bell once for all its parked connections
//! instead of one waiter each. A parked connection costs no wake-up while it stays silent.
//!
//! - A byte, a FIN or an error (`EPOLLIN`, `EPOLLRDHUP`, `EPOLLHUP`, `EPOLLERR`): the record
//!   leaves the set (`EPOLL_CTL_DEL`), the socket goes to tokio, and the connection's task
//!   starts where it would have after its first-byte wait: its first look finds the byte.
//! - Its deadline: the first-byte clock (`max_lifetime` too), as `half_open_due` says,
//!   counted and reset as in the task (`timed_out{first_byte}`, RST); past `limits.grace`
//!   it counts against its source's half-open cap (`Ticket::silent`), refused at the cap.
//! - The bell (pressure flipped, a reload): every deadline is computed again; at the end of
//!   the drain (`ListenerCtx::abort_all`) every record is reset, counted as aborted on
//!   shutdown.
//! - An eviction: the guard tells the lot (`Guard::evictions`), which sweeps its records
//!   for evicted tickets, at most once per [`SWEEP_GAP`]: an evicted parked connection is
//!   reset within that of its eviction, and an eviction flood costs a sweep per gap, not
//!   one per eviction.
//!
//! An open connection idle after an exchange parks here too, as an [`Idle`] record with both
//! sockets: the pump loop (`conn::open`) leaves its task at a progress check that finds it
//! idle for `open::IDLE_PARK` with nothing outstanding (no FIN, no byte in a buffer or pipe,
//! none unanswered, no request open, no byte weighed), on the plain path only: not under a
//! server's `max_conns` (a claim on its slot wants an answer at once, `backend/slot.rs`), not
//! in observe mode, not during the drain. The record keeps the ticket (stalled, idle, as the
//! check left it: evictable when the listener is full), the lease (the server's slot and
//! count stay held), the accept instant and the pump's [`Stamps`]. Its deadline is
//! `open_due`'s (idle from the last byte, `max_lifetime`), counted and reset both ways as in
//! the task; a byte, FIN or error on either socket gives it a new task that resumes the pump
//! loop with the stamps; an eviction is swept as for silent records; a server marked down
//! with `on_down = "abort"` is told through `backend::aborts` (nothing while no server goes
//! down), and its parked connections are reset (`backend_unavailable`).
//!
//! - The listener stops accepting: the lot lives on until its last record leaves (it is one
//!   of the server's connection tasks, so the drain waits for it), then closes; a connection
//!   admitted after that gets a task of its own.
//!
//! Syscalls: parking costs an `epoll_ctl(ADD)`, waking an `epoll_ctl(DEL)` and tokio's
//! registration (another `epoll_ctl(ADD)`), an `epoll_wait` serves a batch of wake-ups. A
//! connection reset by its clock or an eviction leaves the set with its close.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clocks::{Observed, Progress, half_open_due, open_due};
use super::pump::Stamps;
use super::{End, ListenerCtx, count_end, expire, finish, resume, spawn};
use crate::backend::Lease;
use crate::guard::Ticket;
use crate::stats::{Stats, Timeout};

/// Sweeps for evicted records come at most this often.
pub const SWEEP_GAP: Duration = Duration::from_millis(5);
/// Readiness events taken per `epoll_wait`.
const BATCH: usize = 64;
/// Far enough to mean never (no clock runs).
const NEVER: Duration = Duration::from_secs(86_400);

/// A parked connection.
pub(super) struct Record {
    stream: std::net::TcpStream,
    ticket: Ticket,
    peer: SocketAddr,
    accepted: Instant,
    /// When the lot next looks at it (`None`: no clock runs and its grace is past).
    due: Option<Instant>,
    observed: Observed,
    /// Silent past the grace, and counted against its source's half-open cap.
    counted: bool,
}

impl Record {
    pub fn new(
        stream: std::net::TcpStream,
        ticket: Ticket,
        peer: SocketAddr,
        accepted: Instant,
    ) -> Record {
        Record {
            counted: ticket.source().is_none(),
            stream,
            ticket,
            peer,
            accepted,
            due: None,
            observed: Observed::default(),
        }
    }

    pub fn into_parts(self) -> (std::net::TcpStream, Ticket) {
        (self.stream, self.ticket)
    }

    /// The next deadline: its clock's, or the end of its grace, whichever is first; and the
    /// clock.
    fn next(
        &self,
        ctx: &ListenerCtx,
    ) -> (Option<Instant>, Option<(Instant, crate::stats::Timeout)>) {
        let policy = ctx.policy.load();
        let clock = half_open_due(
            &policy.rules(),
            ctx.guard.pressure(),
            self.observed,
            self.accepted,
        );
        let grace = (!self.counted).then_some(self.accepted + policy.grace);
        let due = match (clock.map(|c| c.0), grace) {
            (Some(c), Some(g)) => Some(c.min(g)),
            (c, g) => c.or(g),
        };
        (due, clock)
    }
}

/// An open connection idle after an exchange, parked with both its sockets: what its pump
/// loop needs to go on where it left off.
pub(super) struct Idle {
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    /// Held while parked: the server's slot and its count of connections.
    lease: Lease,
    ticket: Ticket,
    accepted: Instant,
    stamps: Stamps,
    due: Option<Instant>,
    observed: Observed,
}

impl Idle {
    /// The open clocks, as the pump loop would reckon them with nothing moving: idle from
    /// the last byte, `max_lifetime` from the accept.
    fn next(&self, ctx: &ListenerCtx) -> Option<(Instant, Timeout)> {
        let policy = ctx.policy.load();
        let now = Instant::now();
        let progress = Progress {
            last_activity: self.stamps.last_activity(),
            closed: None,
            open_direction_progress: now,
            request_burst: None,
            stalled_since: None,
        };
        let (rules, pressure) = (policy.rules(), ctx.guard.pressure());
        let accepted = self.accepted;
        open_due(
            &rules,
            pressure,
            self.observed,
            accepted,
            &progress,
            None,
            now,
        )
        .clock
    }
}

/// Parks an open connection that is idle after an exchange (the pump loop said so: see
/// `open::IDLE_PARK`); when the lot will not take it, it goes on in a task of its own.
pub(super) fn park_idle(
    ctx: &Arc<ListenerCtx>,
    (client, server): (tokio::net::TcpStream, tokio::net::TcpStream),
    lease: Lease,
    ticket: Ticket,
    accepted: Instant,
    stamps: Stamps,
) {
    // Out of tokio: `into_std` deregisters each socket.
    let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else {
        // The reactor would not let go of one (never seen): its socket is closed, the other
        // with it, and the lease and the ticket give their counts back.
        count_end(&ctx.stats, End::PEER_ERROR);
        return;
    };
    let conn = Box::new(Idle {
        client,
        server,
        lease,
        ticket,
        accepted,
        stamps,
        due: None,
        observed: Observed::default(),
    });
    match ctx.lot() {
        Some(lot) => {
            if let Err(conn) = lot.park_idle(ctx, conn) {
                Lot::respawn(ctx, &lot.tracker, conn, 0);
            }
        }
        // The lot's task is over (a race with the listener's stop): a task without a tracker
        // hears the end of the drain on its bell, as any.
        None => Lot::respawn(ctx, &TaskTracker::new(), conn, 0),
    }
}

/// What a slot of the lot holds.
/// Both boxed: a slot is then 16 bytes whatever it holds, and an idle connection's slot does
/// not carry a silent record's room (128 bytes more each, which took an idle connection
/// held at 1,000 over 1 kB of RSS).
enum Parked {
    Silent(Box<Record>),
    Idle(Box<Idle>),
}

impl Parked {
    /// The gauge that counts its kind.
    fn gauge<'s>(&self, stats: &'s Stats) -> &'s AtomicU64 {
        match self {
            Parked::Silent(_) => &stats.parked,
            Parked::Idle(_) => &stats.parked_idle,
        }
    }

    /// Its sockets in the lot's epoll set: the client's, and the server's when idle.
    fn sockets(&self) -> [Option<&std::net::TcpStream>; 2] {
        match self {
            Parked::Silent(r) => [Some(&r.stream), None],
            Parked::Idle(i) => [Some(&i.client), Some(&i.server)],
        }
    }

    fn ticket(&self) -> &Ticket {
        match self {
            Parked::Silent(r) => &r.ticket,
            Parked::Idle(i) => &i.ticket,
        }
    }

    fn due(&self) -> Option<Instant> {
        match self {
            Parked::Silent(r) => r.due,
            Parked::Idle(i) => i.due,
        }
    }

    fn due_mut(&mut self) -> &mut Option<Instant> {
        match self {
            Parked::Silent(r) => &mut r.due,
            Parked::Idle(i) => &mut i.due,
        }
    }

    /// The next deadline.
    fn next(&self, ctx: &ListenerCtx) -> Option<Instant> {
        match self {
            Parked::Silent(r) => r.next(ctx).0,
            Parked::Idle(i) => i.next(ctx).map(|c| c.0),
        }
    }

    /// At its deadline: how it ends, if it does (its clock ran out, or its source is at its
    /// half-open cap as its grace ends).
    fn expired(&mut self, ctx: &ListenerCtx, now: Instant) -> Option<End> {
        let (clock, observed, ticket) = match self {
            Parked::Silent(r) => (r.next(ctx).1, &mut r.observed, &r.ticket),
            Parked::Idle(i) => (i.next(ctx), &mut i.observed, &i.ticket),
        };
        if let Some((at, c)) = clock
            && at <= now
            && expire(ticket, observed, c)
        {
            return Some(End::TimedOut(c));
        }
        let Parked::Silent(r) = self else {
            return None;
        };
        if !r.counted && r.accepted + ctx.policy.load().grace <= now {
            r.counted = true;
            if let Err(refused) = r.ticket.silent() {
                return Some(End::from_refused(refused));
            }
        }
        None
    }
}

struct Slot {
    era: u32,
    rec: Option<Parked>,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Deadlines, earliest first, with the slot they are for.
    due: BTreeSet<(Instant, u32)>,
    len: usize,
    /// The lot's task has ended: no more parking.
    closed: bool,
}

impl Inner {
    fn take(&mut self, key: u32) -> Option<Parked> {
        let slot = self.slots.get_mut(key as usize)?;
        let rec = slot.rec.take()?;
        slot.era = slot.era.wrapping_add(1);
        if let Some(d) = rec.due() {
            self.due.remove(&(d, key));
        }
        self.free.push(key);
        self.len -= 1;
        Some(rec)
    }

    fn set_due(&mut self, key: u32, due: Option<Instant>) {
        let Some(rec) = self
            .slots
            .get_mut(key as usize)
            .and_then(|s| s.rec.as_mut())
        else {
            return;
        };
        if let Some(d) = rec.due() {
            self.due.remove(&(d, key));
        }
        *rec.due_mut() = due;
        if let Some(d) = due {
            self.due.insert((d, key));
        }
    }
}

/// One listener's parked connections (see the module doc).
pub struct Lot {
    epoll: AsyncFd<OwnedFd>,
    inner: Mutex<Inner>,
    /// A record parked with a deadline earlier than every other: the task sleeps less.
    sooner: Notify,
    /// The listener stopped accepting: the drain is on, and no idle connection parks.
    draining: AtomicBool,
    /// Where woken connections get their task (the server's, which the drain waits on).
    tracker: TaskTracker,
}

impl Lot {
    /// A lot with its epoll set; `Err` when the kernel or the reactor refuses one (the
    /// listener then runs without: every connection gets its task).
    #[allow(unsafe_code)]
    pub fn new(tracker: TaskTracker) -> io::Result<Arc<Lot>> {
        // SAFETY: epoll_create1 takes no pointer; a descriptor it returns is ours alone.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the epoll descriptor, so it stays open, and the same
        // one, for as long as the registration lives.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Arc::new(Lot {
            epoll,
            inner: Mutex::new(Inner::default()),
            sooner: Notify::new(),
            draining: AtomicBool::new(false),
            tracker,
        }))
    }

    /// Parks `r`; hands it back when the lot is closed or epoll refuses it.
    #[expect(
        clippy::result_large_err,
        reason = "handed back whole on a rare failure"
    )]
    pub(super) fn park(&self, ctx: &ListenerCtx, r: Record) -> Result<(), Record> {
        self.insert(ctx, Parked::Silent(Box::new(r)))
            .map_err(|p| match p {
                Parked::Silent(r) => *r,
                Parked::Idle(_) => unreachable!("a silent record comes back silent"),
            })
    }

    /// Whether an idle connection may park now (not once the drain began).
    pub(super) fn takes_idle(&self) -> bool {
        !self.draining.load(Relaxed)
    }

    /// Parks an idle connection; hands it back when the lot is closed, draining or epoll
    /// refuses it, or when it was evicted or its server aborted as it came (the lot's
    /// sweeps may have run before it was in).
    fn park_idle(&self, ctx: &ListenerCtx, conn: Box<Idle>) -> Result<(), Box<Idle>> {
        if !self.takes_idle() {
            return Err(conn);
        }
        self.insert(ctx, Parked::Idle(conn)).map_err(|p| match p {
            Parked::Idle(conn) => conn,
            Parked::Silent(_) => unreachable!("an idle record comes back idle"),
        })
    }

    fn insert(&self, ctx: &ListenerCtx, mut r: Parked) -> Result<(), Parked> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(r);
        };
        // Aborted: the lot may have reset its records already; a task ends at once.
        if inner.closed || ctx.is_aborted() {
            return Err(r);
        }
        // Under the lock a sweep takes: a mark set before this look is seen here, one set
        // after it finds the record in (the flag is set before the lot is told).
        if let Parked::Idle(i) = &r
            && (i.ticket.ctl().is_evicted() || i.lease.is_aborted())
        {
            return Err(r);
        }
        let due = r.next(ctx);
        let key = match inner.free.pop() {
            Some(k) => k,
            None => {
                let Ok(k) = u32::try_from(inner.slots.len()) else {
                    return Err(r);
                };
                inner.slots.push(Slot { era: 0, rec: None });
                k
            }
        };
        let era = inner.slots[key as usize].era;
        // All its sockets in, or none: one that went in before a failure comes out.
        let socks = r.sockets();
        let socks = socks.iter().flatten();
        let added = socks
            .clone()
            .take_while(|s| self.ctl(libc::EPOLL_CTL_ADD, *s, token(key, era)).is_ok())
            .count();
        if added < socks.clone().count() {
            for s in socks.take(added) {
                let _ = self.ctl(libc::EPOLL_CTL_DEL, *s, 0);
            }
            inner.free.push(key);
            return Err(r);
        }
        *r.due_mut() = None;
        r.gauge(&ctx.stats).fetch_add(1, Relaxed);
        inner.slots[key as usize].rec = Some(r);
        inner.len += 1;
        let sooner = due.is_some_and(|d| inner.due.first().is_none_or(|f| d < f.0));
        inner.set_due(key, due);
        drop(inner);
        if sooner {
            self.sooner.notify_one();
        }
        Ok(())
    }

    /// An idle connection back into tokio and a task of its own, resuming its pump loop.
    fn respawn(ctx: &Arc<ListenerCtx>, tracker: &TaskTracker, conn: Box<Idle>, shard: usize) {
        let i = *conn;
        match (
            tokio::net::TcpStream::from_std(i.client),
            tokio::net::TcpStream::from_std(i.server),
        ) {
            (Ok(client), Ok(server)) => {
                let conn = (client, server);
                let (lease, ticket) = (i.lease, i.ticket);
                tracker.spawn(resume(
                    ctx.clone(),
                    conn,
                    lease,
                    ticket,
                    i.accepted,
                    i.stamps,
                    shard,
                ));
            }
            // The reactor would not take one (out of memory): both sockets close, the lease
            // and the ticket give their counts back as they drop.
            _ => {
                ctx.stats.accept_errors.fetch_add(1, Relaxed);
            }
        }
    }

    #[allow(unsafe_code)]
    fn ctl(&self, op: libc::c_int, s: &impl AsFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: data,
        };
        // SAFETY: both descriptors are borrowed from live owners; the kernel copies `ev`.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                op,
                s.as_fd().as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Takes the ready events without waiting; how many.
    #[allow(unsafe_code)]
    fn wait(&self, evs: &mut [libc::epoll_event; BATCH]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most BATCH events into `evs`, which we own.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.get_ref().as_raw_fd(),
                evs.as_mut_ptr(),
                BATCH as libc::c_int,
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Runs the lot until the listener stops accepting (`stop`) and its last record left,
    /// or the drain ends. Spawned on the server's connection tracker, which the drain waits
    /// on; woken connections are spawned there too.
    pub async fn run(
        self: Arc<Self>,
        ctx: Arc<ListenerCtx>,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) {
        // The waiter first, then the count: no ring falls between them.
        let mut bell = pin!(ctx.guard.bell().next_ring(0));
        let mut rung = ctx.guard.bell().rung();
        let mut evicted = pin!(ctx.guard.evictions());
        let mut stopped = pin!(stop.cancelled());
        let mut down = pin!(crate::backend::aborts());
        let mut stopping = false;
        let mut sleep = pin!(sleep_until(Instant::now() + NEVER));
        let mut last_sweep = Instant::now() - SWEEP_GAP;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            let sooner = self.sooner.notified();
            let next = self.lock().and_then(|i| i.due.first().map(|d| d.0));
            let wake = next.unwrap_or_else(|| Instant::now() + NEVER);
            if sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
            }
            // Closed under the lock that finds it empty: nothing parks after the last look.
            if stopping
                && let Some(mut i) = self.lock()
                && i.len == 0
            {
                i.closed = true;
                break;
            }
            tokio::select! {
                biased;
                _ = &mut bell => {
                    bell.set(ctx.guard.bell().next_ring(0));
                    let now = ctx.guard.bell().rung();
                    if now != rung {
                        rung = now;
                        if ctx.is_aborted() {
                            self.end_all(&ctx, End::Shutdown);
                        } else {
                            self.recompute(&ctx);
                        }
                    }
                }
                r = self.epoll.readable() => match r {
                    Ok(mut ready) => {
                        let n = self.wait(&mut evs).unwrap_or(0);
                        self.wake(&ctx, &tracker, &evs[..n]);
                        if n < BATCH {
                            // Taken all; an event after the look sets it again.
                            ready.clear_ready();
                        } else {
                            // A full batch: the others' turn before the next.
                            tokio::task::yield_now().await;
                        }
                    }
                    // The reactor is gone: the runtime shuts down.
                    Err(_) => break,
                },
                _ = &mut evicted => {
                    // At most one sweep per gap: an eviction flood does not make one per
                    // eviction.
                    let gap = last_sweep + SWEEP_GAP;
                    if Instant::now() < gap {
                        sleep_until(gap).await;
                    }
                    evicted.set(ctx.guard.evictions());
                    last_sweep = Instant::now();
                    self.sweep(&ctx);
                }
                // A server went down with `on_down = "abort"`: its parked connections go as
                // its tasks do.
                _ = &mut down => {
                    down.set(crate::backend::aborts());
                    for r in self.take_where(|r| matches!(r, Parked::Idle(i) if i.lease.is_aborted())) {
                        Lot::end(&ctx, r, End::Backend);
                    }
                }
                _ = &mut sleep => self.expire(&ctx),
                _ = sooner => {}
                _ = &mut stopped, if !stopping => {
                    stopping = true;
                    self.draining.store(true, Relaxed);
                }
            }
        }
        // The reactor is gone: what is left goes with the runtime.
        if let Some(mut i) = self.lock() {
            i.closed = true;
        }
        self.end_all(&ctx, End::Shutdown);
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().ok()
    }

    /// Takes the records `pick` chooses, out of the lock.
    fn take_where(&self, mut pick: impl FnMut(&Parked) -> bool) -> Vec<Parked> {
        let Some(mut inner) = self.lock() else {
            return Vec::new();
        };
        let keys: Vec<u32> = (inner.slots.iter().enumerate())
            .filter(|(_, s)| s.rec.as_ref().is_some_and(&mut pick))
            .map(|(k, _)| k as u32)
            .collect();
        keys.into_iter().filter_map(|k| inner.take(k)).collect()
    }

    /// Ends a record that left the lot without a task.
    fn end(ctx: &ListenerCtx, r: Parked, end: End) {
        r.gauge(&ctx.stats).fetch_sub(1, Relaxed);
        match r {
            Parked::Silent(r) => finish(ctx, end, r.stream, None, r.ticket, r.accepted),
            Parked::Idle(i) => {
                let i = *i;
                finish(
                    ctx,
                    end,
                    i.client,
                    Some((i.server, i.lease)),
                    i.ticket,
                    i.accepted,
                );
            }
        }
    }

    fn end_all(&self, ctx: &ListenerCtx, end: End) {
        for r in self.take_where(|_| true) {
            Lot::end(ctx, r, end);
        }
    }

    /// Records whose ticket was evicted: reset (the guard counted them).
    fn sweep(&self, ctx: &ListenerCtx) {
        for r in self.take_where(|r| r.ticket().ctl().is_evicted()) {
            Lot::end(ctx, r, End::Evicted);
        }
    }

    /// Every deadline again: the policy or the pressure changed.
    fn recompute(&self, ctx: &ListenerCtx) {
        let Some(mut inner) = self.lock() else {
            return;
        };
        let due: Vec<(u32, Option<Instant>)> = (inner.slots.iter().enumerate())
            .filter_map(|(k, s)| s.rec.as_ref().map(|r| (k as u32, r.next(ctx))))
            .collect();
        for (k, d) in due {
            inner.set_due(k, d);
        }
        drop(inner);
        self.sooner.notify_one();
    }

    /// Records whose deadline came: a clock ran out, or the grace ended.
    fn expire(&self, ctx: &ListenerCtx) {
        let now = Instant::now();
        let Some(mut inner) = self.lock() else {
            return;
        };
        let keys: Vec<u32> = inner.due.range(..=(now, u32::MAX)).map(|d| d.1).collect();
        let mut ended = Vec::new();
        for k in keys {
            let Some(r) = inner.slots[k as usize].rec.as_mut() else {
                continue;
            };
            match r.expired(ctx, now) {
                Some(e) => {
                    if let Some(r) = inner.take(k) {
                        ended.push((r, e));
                    }
                }
                None => {
                    let due = r.next(ctx);
                    inner.set_due(k, due);
                }
            }
        }
        drop(inner);
        for (r, e) in ended {
            Lot::end(ctx, r, e);
        }
    }

    /// Records whose socket became ready: out of the set, into tokio and a task.
    fn wake(&self, ctx: &Arc<ListenerCtx>, tracker: &TaskTracker, evs: &[libc::epoll_event]) {
        let mut woke = Vec::with_capacity(evs.len());
        if let Some(mut inner) = self.lock() {
            for ev in evs {
                let (key, era) = untoken(ev.u64);
                if inner.slots.get(key as usize).is_none_or(|s| s.era != era) {
                    continue;
                }
                if let Some(r) = inner.take(key) {
                    // Out of this set before tokio's takes it; a failure leaves a stale
                    // registration whose events the generation check drops.
                    for s in r.sockets().into_iter().flatten() {
                        let _ = self.ctl(libc::EPOLL_CTL_DEL, s, 0);
                    }
                    woke.push((key, r));
                }
            }
        }
        for (key, r) in woke {
            r.gauge(&ctx.stats).fetch_sub(1, Relaxed);
            match r {
                Parked::Silent(r) => {
                    spawn(ctx, tracker, r.stream, r.peer, r.ticket, r.accepted, None)
                }
                Parked::Idle(i) => Lot::respawn(ctx, tracker, i, key as usize),
            }
        }
    }
}

fn token(key: u32, era: u32) -> u64 {
    (u64::from(era) << 32) | u64::from(key)
}

fn untoken(t: u64) -> (u32, u32) {
    (t as u32, (t >> 32) as u32)
}
