//! The redirect loops: kept-alive cleartext connections whose requests the
//! fast path answers are served by threads of their own, each with one epoll
//! instance, one read buffer and one answer buffer, instead of a tokio task
//! per connection reading through Pingora's stream layers.
//!
//! How a connection gets here: Pingora accepts it and
//! [`super::client_limits`] serves its first request. After a fast-path
//! answer on a kept-alive connection, with nothing more read, the socket is
//! handed to a loop ([`RedirectLoops::hand_off`]). The loop then reads each
//! request header, lets [`RedirectFastPath::answer`] answer it and writes the
//! answer, under the limits `client_limits.rs` applies: a later request's
//! header must be whole within `edge.client_header_timeout_ms` of its first
//! byte (else a 408 and a close), and a connection may sit idle between
//! requests for `edge.keepalive_timeout_ms` (else a close). An answer the
//! client does not take (its socket buffer stays full) gets the keep-alive
//! time too.
//!
//! A request the fast path does not answer (another path or method, a body,
//! HTTP/1.0, pipelined requests, an oversized header) hands the connection
//! back to Pingora with every byte read so far ([`HandBack`]): it is served
//! from then on as any other connection is. So the loops change how much a
//! redirect costs, never what any request gets.
//!
//! When the edge shuts down (SIGTERM, or a graceful upgrade's hand-over),
//! idle connections are closed at once and a connection in the middle of a
//! request is closed after its answer, as `client_limits.rs` does.
//!
//! `edge.redirect_loop: false` keeps every connection on tokio.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::client_limits::{HeaderScan, MAX_HEAD, timeout_response};
use super::fast_path::RedirectFastPath;

/// Gives a connection back to Pingora: `head` holds every byte read from it
/// that has not been answered (a whole request header, or more than
/// `MAX_HEAD` bytes without one).
pub trait HandBack: Send + Sync {
    fn hand_back(&self, fd: OwnedFd, head: BytesMut, runtime: &tokio::runtime::Handle);
}

/// A kept-alive connection handed to a loop, idle since `idle_from`.
pub struct Handoff {
    pub fd: OwnedFd,
    pub peer: Option<IpAddr>,
    pub idle_from: Instant,
    pub back: Arc<dyn HandBack>,
    /// The runtime that accepted it, where it goes back to.
    pub runtime: tokio::runtime::Handle,
}

impl Handoff {
    fn give_back(self, head: BytesMut) {
        self.back.hand_back(self.fd, head, &self.runtime);
    }
}

/// The loop threads of one listening service.
pub struct RedirectLoops {
    fast: Arc<RedirectFastPath>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    threads: usize,
    /// Started on the first hand-off (not before Pingora has daemonised);
    /// `None` when they could not be started (the edge then keeps every
    /// connection on tokio, and says so once).
    inboxes: OnceLock<Option<Vec<Arc<Inbox>>>>,
    next: AtomicUsize,
    stopping: Arc<AtomicBool>,
}

/// Where a loop receives its connections: a queue and an eventfd that wakes
/// the loop, written only when the loop is not already due to look.
struct Inbox {
    queue: Mutex<(Vec<Handoff>, bool)>,
    wake: OwnedFd,
    /// Cleared when the loop's thread ends (it should not): connections then
    /// stay on tokio instead of waiting in a queue nobody reads.
    alive: AtomicBool,
}

impl Inbox {
    fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            queue: Mutex::new((Vec::new(), false)),
            wake,
            alive: AtomicBool::new(true),
        })
    }

    /// Queues `h` (or only wakes the loop) unless the loop has ended: then
    /// `h` comes back. `alive` is checked under the queue's lock, which the
    /// loop takes to clear it, so nothing is queued after its last drain.
    fn push(&self, h: Option<Handoff>) -> Option<Handoff> {
        let wake = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if !self.alive.load(Ordering::SeqCst) {
                return h;
            }
            if let Some(h) = h {
                q.0.push(h);
            }
            !std::mem::replace(&mut q.1, true)
        };
        if wake {
            self.signal();
        }
        None
    }

    /// The loop has ended: no more hand-offs; those queued go back to
    /// Pingora.
    fn close(&self) {
        {
            let _q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.alive.store(false, Ordering::SeqCst);
        }
        for h in self.take() {
            h.give_back(BytesMut::new());
        }
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full
        // counter (EAGAIN) still leaves the loop woken.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Drains the eventfd first, then the queue: a hand-off queued after
    /// the drain writes the eventfd again, so none is left behind.
    fn take(&self) -> Vec<Handoff> {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN leaves it alone.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.1 = false;
        std::mem::take(&mut q.0)
    }
}

impl RedirectLoops {
    pub fn new(
        fast: Arc<RedirectFastPath>,
        header_timeout: Duration,
        keepalive_timeout: Duration,
        threads: usize,
    ) -> Self {
        Self {
            fast,
            header_timeout,
            keepalive_timeout,
            threads: threads.max(1),
            inboxes: OnceLock::new(),
            next: AtomicUsize::new(0),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a connection can be handed off now: the loops run (starting
    /// them on the first call; `watch` tells them when to shut down) and
    /// the edge is not shutting down.
    pub fn accepting(&self, watch: &pingora::server::ShutdownWatch) -> bool {
        !self.stopping.load(Ordering::Relaxed)
            && self
                .inboxes
                .get_or_init(|| self.start(watch))
                .as_ref()
                .is_some_and(|inboxes| inboxes.iter().any(|i| i.alive.load(Ordering::Relaxed)))
    }

    /// Queues a connection on the next running loop (round robin). When
    /// the loops are shutting down, the connection is closed, as an idle
    /// one would be; when none runs, it goes back to Pingora.
    pub fn hand_off(&self, h: Handoff) {
        let Some(Some(inboxes)) = self.inboxes.get() else {
            h.give_back(BytesMut::new());
            return;
        };
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut h = h;
        for k in 0..inboxes.len() {
            match inboxes[(first + k) % inboxes.len()].push(Some(h)) {
                None => {
                    self.fast.metrics.redirect_loop_handoffs.inc();
                    return;
                }
                Some(back) => h = back,
            }
        }
        h.give_back(BytesMut::new());
    }

    fn start(&self, watch: &pingora::server::ShutdownWatch) -> Option<Vec<Arc<Inbox>>> {
        let mut inboxes = Vec::with_capacity(self.threads);
        for n in 0..self.threads {
            let started = Inbox::new().map(Arc::new).and_then(|inbox| {
                let lp = Loop::new(
                    inbox.clone(),
                    self.fast.clone(),
                    self.header_timeout,
                    self.keepalive_timeout,
                    self.stopping.clone(),
                )?;
                std::thread::Builder::new()
                    .name(format!("uload-redirect-{n}"))
                    .spawn(move || lp.run())?;
                Ok(inbox)
            });
            match started {
                Ok(inbox) => inboxes.push(inbox),
                Err(e) => {
                    tracing::error!(
                        "starting redirect loop {n}: {e}; kept-alive connections stay on tokio"
                    );
                    // Loops already started simply never get a connection.
                    return None;
                }
            }
        }
        // Tell the loops when the edge starts shutting down.
        let stopping = self.stopping.clone();
        let wake: Vec<Arc<Inbox>> = inboxes.clone();
        let watch = watch.clone();
        tokio::spawn(async move {
            super::client_limits::shutdown_signal(watch).await;
            stopping.store(true, Ordering::SeqCst);
            for inbox in &wake {
                // An ended loop has nothing to stop.
                let _ = inbox.push(None);
            }
        });
        Some(inboxes)
    }
}

/// The token of the inbox's eventfd in the epoll set.
const WAKE: u64 = u64::MAX;
/// Bytes read per `recv`. A request that came whole in one read is answered
/// from here; only a partial header is copied into its connection.
const READ_BUF: usize = 16 * 1024;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// One connection in a loop.
struct Conn {
    fd: OwnedFd,
    /// Its epoll token (slot and generation); a `MOD` must give it again.
    token: u64,
    peer: Option<IpAddr>,
    /// A request header that has not come whole yet (empty between requests).
    head: BytesMut,
    scan: HeaderScan,
    /// When the connection is cut: the end of its idle time, of its header
    /// time, or of the time its answer may take to go out.
    deadline: Instant,
    /// An answer the socket did not take at once, and how much of it went.
    pending: Vec<u8>,
    sent: usize,
    /// Close once `pending` is out (`Connection: close`, or shutting down).
    close_after: bool,
    back: Arc<dyn HandBack>,
    runtime: tokio::runtime::Handle,
}

enum Outcome {
    Keep,
    Close,
    /// Back to Pingora, with the bytes read and not answered.
    HandBack(BytesMut),
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

struct Loop {
    inbox: Arc<Inbox>,
    stopping: Arc<AtomicBool>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    io: LoopIo,
}

/// What serving a connection needs besides the connection itself.
struct LoopIo {
    fast: Arc<RedirectFastPath>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    read: Box<[u8]>,
    answer: Vec<u8>,
    epoll: OwnedFd,
    /// The wall clock, read once for the requests of one `epoll_wait`
    /// (µs since the epoch; `None` until a request needs it).
    wall_us: Option<u64>,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Loop {
    fn new(
        inbox: Arc<Inbox>,
        fast: Arc<RedirectFastPath>,
        header_timeout: Duration,
        keepalive_timeout: Duration,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        // SAFETY: no memory arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(last_error());
        }
        // SAFETY: just created, owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            inbox.wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        Ok(Self {
            inbox,
            stopping,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            io: LoopIo {
                fast,
                header_timeout,
                keepalive_timeout,
                read: vec![0u8; READ_BUF].into_boxed_slice(),
                answer: Vec::with_capacity(1024),
                epoll,
                wall_us: None,
            },
        })
    }

    /// How often deadlines are looked at: a quarter of the shorter limit,
    /// between 10 ms and 1 s (a deadline is met that much late at most).
    fn tick(&self) -> Duration {
        (self.io.header_timeout.min(self.io.keepalive_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn run(mut self) {
        // However the thread ends, its inbox stops taking connections and
        // the ones queued go back to Pingora (those it held are closed when
        // the loop is dropped).
        struct Ended(Arc<Inbox>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _ended = Ended(self.inbox.clone());
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let tick = self.tick();
        // The time of the last wake-up, which the next timeout counts from
        // (so a wait can end up to one batch's work late; a sweep tick is
        // at least 10 ms): one clock read per `epoll_wait`, not two.
        let mut now = Instant::now();
        let mut next_sweep = now + tick;
        loop {
            let timeout = if self.live == 0 {
                -1
            } else {
                let left = next_sweep.saturating_duration_since(now);
                left.as_millis().min(i32::MAX as u128) as i32 + 1
            };
            // SAFETY: `events` is a live buffer of EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.io.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as i32,
                    timeout,
                )
            };
            if n < 0 {
                let e = last_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Not expected of a valid epoll fd and buffer; the loop's
                // connections are closed, their clients reconnect.
                tracing::error!("redirect loop: epoll_wait: {e}; closing its connections");
                return;
            }
            now = Instant::now();
            self.io.wall_us = None;
            let mut woken = false;
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                if token == WAKE {
                    self.take_inbox();
                    woken = true;
                } else {
                    // A panic serving one connection (a bug) closes that
                    // connection, not the loop and all of its others.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.ready(token, flags, now)
                    }));
                    if served.is_err() {
                        tracing::error!("redirect loop: a connection's request panicked; closed");
                        self.remove(token as u32 as usize);
                    }
                }
            }
            // After the batch: a connection whose next request came in it
            // has been served, not closed as idle.
            let stopping = woken && self.stopping.load(Ordering::SeqCst);
            if stopping || now >= next_sweep {
                if self.live > 0 {
                    self.sweep(now);
                }
                next_sweep = now + tick;
            }
        }
    }

    fn take_inbox(&mut self) {
        for h in self.inbox.take() {
            self.register(h);
        }
    }

    /// Takes a connection into the loop (also while shutting down: the
    /// sweep that follows answers a request already waiting, then closes).
    fn register(&mut self, h: Handoff) {
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                self.slots.len() - 1
            }
        };
        let token = (self.slots[idx].generation as u64) << 32 | idx as u64;
        // Edge-triggered: an event for each arrival of data. If the next
        // request is already waiting, adding the socket reports it.
        if let Err(e) = epoll_ctl(
            self.io.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            h.fd.as_raw_fd(),
            READ_EVENTS,
            token,
        ) {
            tracing::debug!("redirect loop: adding a connection: {e}; back to Pingora");
            self.free.push(idx as u32);
            h.give_back(BytesMut::new());
            return;
        }
        self.slots[idx].conn = Some(Conn {
            fd: h.fd,
            token,
            peer: h.peer,
            head: BytesMut::new(),
            scan: HeaderScan::default(),
            deadline: h.idle_from + self.io.keepalive_timeout,
            pending: Vec::new(),
            sent: 0,
            close_after: false,
            back: h.back,
            runtime: h.runtime,
        });
        self.live += 1;
        self.io.fast.metrics.redirect_loop_connections.inc();
    }

    fn ready(&mut self, token: u64, flags: u32, now: Instant) {
        let idx = token as u32 as usize;
        let generation = (token >> 32) as u32;
        let stopping = self.stopping.load(Ordering::Relaxed);
        let outcome = match self.slots.get_mut(idx) {
            Some(Slot {
                generation: g,
                conn: Some(conn),
            }) if *g == generation => self.io.serve(conn, flags, now, stopping),
            _ => return,
        };
        if !matches!(outcome, Outcome::Keep) {
            self.settle(idx, outcome);
        }
    }

    /// Does what serving a connection came to.
    fn settle(&mut self, idx: usize, outcome: Outcome) {
        match outcome {
            Outcome::Keep => {}
            Outcome::Close => self.remove(idx),
            Outcome::HandBack(head) => {
                if let Some(conn) = self.take(idx) {
                    let _ = epoll_ctl(
                        self.io.epoll.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        conn.fd.as_raw_fd(),
                        0,
                        0,
                    );
                    self.io.fast.metrics.redirect_loop_handbacks.inc();
                    conn.back.hand_back(conn.fd, head, &conn.runtime);
                }
            }
        }
    }

    /// Cuts connections whose deadline has passed (a partial header gets
    /// its 408 first) and, when shutting down, idle ones: a request already
    /// waiting in an idle one's socket (not among this batch's events, or
    /// sent just now) is read and answered first, with `Connection: close`,
    /// rather than met with a reset.
    fn sweep(&mut self, now: Instant) {
        let stopping = self.stopping.load(Ordering::SeqCst);
        for idx in 0..self.slots.len() {
            let Some(conn) = self.slots[idx].conn.as_mut() else {
                continue;
            };
            let idle = |c: &Conn| c.head.is_empty() && c.pending.is_empty();
            if stopping && idle(conn) && now < conn.deadline {
                match self.io.serve(conn, 0, now, true) {
                    Outcome::Keep if !idle(conn) => continue, // still busy
                    Outcome::Keep => {}
                    outcome => {
                        self.settle(idx, outcome);
                        continue;
                    }
                }
            }
            let Some(conn) = &self.slots[idx].conn else {
                continue;
            };
            if now < conn.deadline && !(stopping && idle(conn)) {
                continue;
            }
            if !conn.head.is_empty() && conn.pending.is_empty() {
                // Best effort, as client_limits.rs does: one try, no wait.
                let _ = send(conn.fd.as_raw_fd(), &timeout_response());
                shutdown_write(conn.fd.as_raw_fd());
            }
            self.remove(idx);
        }
        // Free slots at the end go (a burst of connections does not leave
        // a long table to sweep). No event of this batch is still to come,
        // so a slot made again later cannot meet a stale one.
        let len = self.slots.len();
        while self.slots.last().is_some_and(|s| s.conn.is_none()) {
            self.slots.pop();
        }
        if self.slots.len() < len {
            let kept = self.slots.len() as u32;
            self.free.retain(|&i| i < kept);
            if self.slots.capacity() > 4 * self.slots.len().max(64) {
                self.slots.shrink_to_fit();
                self.free.shrink_to_fit();
            }
        }
    }

    fn take(&mut self, idx: usize) -> Option<Conn> {
        let slot = self.slots.get_mut(idx)?;
        let conn = slot.conn.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(idx as u32);
        self.live -= 1;
        self.io.fast.metrics.redirect_loop_connections.dec();
        Some(conn)
    }

    /// Closes a connection (closing its only fd takes it out of the epoll set).
    fn remove(&mut self, idx: usize) {
        drop(self.take(idx));
    }
}

impl Drop for Loop {
    /// Only when the thread ends (it should not): its connections close with
    /// it, and leave the gauge.
    fn drop(&mut self) {
        let live = i64::try_from(self.live).unwrap_or(i64::MAX);
        self.io.fast.metrics.redirect_loop_connections.sub(live);
    }
}

/// Edge-triggered reads, and a peer's close reported as readable.
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
/// While an answer waits for room in the socket buffer.
const WRITE_EVENTS: u32 = READ_EVENTS | libc::EPOLLOUT as u32;

impl LoopIo {
    // Inlined into the loop's event handling, as it was before the shutdown
    // sweep called it too (a call costs the redirect some 30 instructions).
    #[inline(always)]
    fn serve(&mut self, conn: &mut Conn, flags: u32, now: Instant, stopping: bool) -> Outcome {
        if !conn.pending.is_empty() {
            if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                return Outcome::Close;
            }
            match self.flush(conn, now) {
                Err(()) => return Outcome::Close,
                Ok(false) => return Outcome::Keep,
                Ok(true) if conn.close_after => {
                    shutdown_write(conn.fd.as_raw_fd());
                    return Outcome::Close;
                }
                Ok(true) => {
                    conn.deadline = now + self.keepalive_timeout;
                    if !self.watch(conn, READ_EVENTS) {
                        return Outcome::Close;
                    }
                    // A request may have come while the answer waited: read.
                }
            }
        }
        // The client has shut its side (it may still wait for an answer).
        let peer_done = flags & libc::EPOLLRDHUP as u32 != 0;
        loop {
            let n = match recv(conn.fd.as_raw_fd(), &mut self.read) {
                Ok(0) => return Outcome::Close,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Outcome::Keep,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Outcome::Close,
            };
            // A read that filled the buffer may have left more behind.
            let more = n == self.read.len();
            let data = &self.read[..n];
            let whole = if conn.head.is_empty() {
                conn.scan = HeaderScan::default();
                conn.scan.complete(data)
            } else {
                conn.head.extend_from_slice(data);
                conn.scan.complete(&conn.head)
            };
            if !whole {
                if conn.head.is_empty() {
                    // The first byte of a request starts its header's clock.
                    conn.deadline = now + self.header_timeout;
                    conn.head.extend_from_slice(data);
                }
                if conn.head.len() > MAX_HEAD {
                    // Pingora refuses it (431/400), as it would have.
                    return Outcome::HandBack(std::mem::take(&mut conn.head));
                }
                if more {
                    continue;
                }
                if peer_done {
                    // The rest of the header can no longer come.
                    return Outcome::Close;
                }
                return Outcome::Keep;
            }
            let head: &[u8] = if conn.head.is_empty() {
                data
            } else {
                &conn.head
            };
            let clock = *self.wall_us.get_or_insert_with(crate::ratelimit::now_us);
            let answered = self.fast.answer_at(
                head,
                conn.peer,
                now,
                Some(clock),
                stopping,
                &mut self.answer,
            );
            let Some(keepalive) = answered else {
                let rest = if conn.head.is_empty() {
                    BytesMut::from(data)
                } else {
                    std::mem::take(&mut conn.head)
                };
                return Outcome::HandBack(rest);
            };
            // An idle connection holds no header buffer (the usual request
            // comes whole in one read and never needs one).
            if conn.head.capacity() > 0 {
                conn.head = BytesMut::new();
            }
            conn.close_after = !keepalive || stopping;
            conn.deadline = now + self.keepalive_timeout;
            let sent = match send(conn.fd.as_raw_fd(), &self.answer) {
                Ok(sent) => sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(_) => return Outcome::Close,
            };
            if sent < self.answer.len() {
                return if self.wait_writable(conn, sent) {
                    Outcome::Keep
                } else {
                    Outcome::Close
                };
            }
            if conn.close_after {
                shutdown_write(conn.fd.as_raw_fd());
                return Outcome::Close;
            }
            if !more {
                if peer_done {
                    // Answered; the client will send nothing more.
                    shutdown_write(conn.fd.as_raw_fd());
                    return Outcome::Close;
                }
                return Outcome::Keep;
            }
        }
    }

    /// Keeps the unsent part of the answer and asks for a writable event;
    /// false when the socket cannot be watched.
    fn wait_writable(&mut self, conn: &mut Conn, sent: usize) -> bool {
        self.fast.metrics.redirect_loop_write_waits.inc();
        conn.pending.clear();
        conn.pending.extend_from_slice(&self.answer[sent..]);
        conn.sent = 0;
        self.watch(conn, WRITE_EVENTS)
    }

    /// Changes the events the loop's epoll set reports for `conn`; false
    /// when the socket cannot be watched.
    fn watch(&self, conn: &Conn, events: u32) -> bool {
        epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            conn.fd.as_raw_fd(),
            events,
            conn.token,
        )
        .is_ok()
    }

    /// Sends what is pending: Ok(true) when all of it is out. Each write
    /// that goes out gives the client the keep-alive time again to take
    /// more (a slow reader that keeps reading is not cut off).
    fn flush(&mut self, conn: &mut Conn, now: Instant) -> Result<bool, ()> {
        while conn.sent < conn.pending.len() {
            match send(conn.fd.as_raw_fd(), &conn.pending[conn.sent..]) {
                Ok(n) => {
                    conn.sent += n;
                    conn.deadline = now + self.keepalive_timeout;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        conn.pending = Vec::new();
        conn.sent = 0;
        Ok(true)
    }
}

fn epoll_ctl(epoll: RawFd, op: i32, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a live epoll_event; the fds are checked by the kernel.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } < 0 {
        return Err(last_error());
    }
    Ok(())
}

// `recv` and `send` are made as plain system calls: glibc's wrappers are
// thread-cancellation points, which costs two calls around each (about 2%
// of a redirect's CPU in a profile) for a feature nothing here uses. Every
// argument goes as a `long`, as syscall(2) reads them.

fn recv(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recvfrom(2) into `buf`, live and writable for its length; no
    // address is asked for.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf.as_mut_ptr(),
            buf.len(),
            0 as libc::c_long,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    if n < 0 {
        return Err(last_error());
    }
    Ok(n as usize)
}

fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: sendto(2) from `buf`, live for its length, to the connected
    // peer. MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(libc::MSG_NOSIGNAL),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    };
    if n < 0 {
        return Err(last_error());
    }
    Ok(n as usize)
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: no memory arguments; an error (peer gone) changes nothing.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}
