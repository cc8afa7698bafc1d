//! The redirect loops: cleartext connections are accepted and served by
//! threads of their own, each with one epoll instance, one read buffer and
//! one answer buffer, instead of a tokio task per connection reading
//! through Pingora's stream layers.
//!
//! The loops accept from the cleartext listener themselves
//! ([`RedirectLoops::accept_from`], from `loop_listener.rs`): every loop
//! watches the listening socket (`EPOLLEXCLUSIVE`, so the kernel wakes one
//! loop per new connection), accepts, and reads the first request at once
//! (it usually comes with the connection). Each request header is read,
//! [`RedirectFastPath::answer`] answers it and the answer is written, under
//! the limits `client_limits.rs` applies on Pingora's side: a connection's
//! first request header must be whole within `edge.client_header_timeout_ms`
//! of the accept and a later one within as long of its first byte (else a
//! 408 and a close), and a connection may sit idle between requests for
//! `edge.keepalive_timeout_ms` (else a close). An answer the client does
//! not take (its socket buffer stays full) gets the keep-alive time too.
//!
//! A request the fast path does not answer (another path or method, a body,
//! HTTP/1.0, pipelined requests, an oversized header) hands the connection
//! to Pingora with every byte read so far ([`HandBack`]): it is served from
//! then on as any other connection is. So the loops change how much a
//! redirect costs, never what any request gets (`tests/fast_path.rs`
//! compares their answers with Pingora's).
//!
//! When the edge shuts down (SIGTERM, or a graceful upgrade's hand-over),
//! the loops stop accepting and this process closes its listening socket
//! (after a hand-over the new process has it; after SIGTERM new clients are
//! refused at once, as when Pingora's listener closes), idle connections
//! are closed at once, a connection in the middle of a request is closed
//! after its answer, as `client_limits.rs` does, and a new connection's
//! first request is still waited for and answered.
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

/// Gives a connection to Pingora: `head` holds every byte read from it
/// that has not been answered (a whole request header, or more than
/// `MAX_HEAD` bytes without one), or nothing when the loop could not take a
/// connection it accepted.
pub trait HandBack: Send + Sync {
    fn hand_back(&self, fd: OwnedFd, head: BytesMut, runtime: &tokio::runtime::Handle);
}

/// A listening socket the loops accept cleartext connections from: every
/// loop watches it, and the kernel wakes one of them per new connection.
pub struct Listener {
    /// Closed when the last loop lets go of the listener (they do when the
    /// edge starts shutting down, after taking it out of their epoll sets).
    /// Pingora's table of listening sockets holds its number, to pass on
    /// in a graceful upgrade, which happens before that.
    pub socket: std::net::TcpListener,
    /// Where a connection goes whose request the fast path does not answer.
    pub back: Arc<dyn HandBack>,
    /// The runtime that serves those connections.
    pub runtime: tokio::runtime::Handle,
}

/// The loop threads of the edge.
pub struct RedirectLoops {
    fast: Arc<RedirectFastPath>,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    busy_poll: Duration,
    threads: usize,
    /// Started by [`Self::accept_from`] (not before Pingora has
    /// daemonised); `None` when they could not be started.
    inboxes: OnceLock<Option<Vec<Arc<Inbox>>>>,
    stopping: Arc<AtomicBool>,
    /// Loops still running: when the last one ends (it should not), the
    /// edge exits, since nothing accepts its cleartext connections any more,
    /// and its supervisor starts it again.
    running: Arc<AtomicUsize>,
}

/// How a loop is told what to do: a listener to watch, or to look at the
/// stop flag; an eventfd wakes it, written only when it is not already due
/// to look.
struct Inbox {
    queue: Mutex<Queue>,
    wake: OwnedFd,
}

#[derive(Default)]
struct Queue {
    listener: Option<Arc<Listener>>,
    woken: bool,
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
            queue: Mutex::new(Queue::default()),
            wake,
        })
    }

    /// Gives the loop a listener to watch (`None`: only wakes it).
    fn push(&self, listener: Option<Arc<Listener>>) {
        let wake = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if listener.is_some() {
                q.listener = listener;
            }
            !std::mem::replace(&mut q.woken, true)
        };
        if wake {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full
            // counter (EAGAIN) still leaves the loop woken.
            unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Drains the eventfd first, then the queue: a push after the drain
    /// writes the eventfd again, so nothing is left behind.
    fn take(&self) -> Option<Arc<Listener>> {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN leaves it alone.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.woken = false;
        q.listener.take()
    }
}

impl RedirectLoops {
    pub fn new(
        fast: Arc<RedirectFastPath>,
        header_timeout: Duration,
        keepalive_timeout: Duration,
        busy_poll: Duration,
        threads: usize,
    ) -> Self {
        Self {
            fast,
            header_timeout,
            keepalive_timeout,
            busy_poll,
            threads: threads.max(1),
            inboxes: OnceLock::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Has every loop accept connections from `listener`, starting the
    /// loops (`watch` tells them when to shut down); false when they cannot
    /// run. They stop accepting when the edge starts shutting down.
    pub fn accept_from(&self, listener: Listener, watch: &pingora::server::ShutdownWatch) -> bool {
        let Some(inboxes) = self.inboxes.get_or_init(|| self.start(watch)) else {
            return false;
        };
        let listener = Arc::new(listener);
        for inbox in inboxes {
            inbox.push(Some(listener.clone()));
        }
        true
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
                    self.busy_poll,
                    self.stopping.clone(),
                )?;
                let running = self.running.clone();
                running.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name(format!("uload-redirect-{n}"))
                    .spawn(move || lp.run(&running));
                if spawned.is_err() {
                    self.running.fetch_sub(1, Ordering::SeqCst);
                }
                spawned?;
                Ok(inbox)
            });
            match started {
                Ok(inbox) => inboxes.push(inbox),
                Err(e) => {
                    tracing::error!("starting redirect loop {n}: {e}");
                    // Loops already started never get the listener.
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
                inbox.push(None);
            }
        });
        Some(inboxes)
    }
}

/// The token of the inbox's eventfd in the epoll set.
const WAKE: u64 = u64::MAX;
/// The token of the listener, when the loop accepts connections.
const LISTEN: u64 = u64::MAX - 1;
/// Connections accepted per wake-up at most, so that one loop does not
/// take a whole burst while the others sleep.
const ACCEPTS_PER_WAKE: usize = 32;
/// How long accepting pauses after an error other than "nothing to accept"
/// (no file descriptors or memory left): the listener stays readable, and
/// retrying at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
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
    /// Accepted by the loop and its first request not answered yet: its
    /// header's clock runs from the accept, and a shutdown waits for the
    /// request (the client has just connected to send it) rather than
    /// closing the connection as idle.
    first: bool,
}

enum Outcome {
    Keep,
    /// Closing the socket sends its FIN after the answer (a `shutdown`
    /// first would be one more system call for the same).
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
    /// The listener the loop accepts from, if any.
    listener: Option<Arc<Listener>>,
    /// Where its connections go that the fast path does not answer, and
    /// the runtime serving them: the listener's, kept after the listener
    /// is let go at shutdown (its connections may still need them).
    hand_back: Option<(Arc<dyn HandBack>, tokio::runtime::Handle)>,
    /// Whether the last try to watch the listener failed (said once per
    /// streak of failures).
    watch_failing: bool,
    /// Set while accepting pauses after an error ([`ACCEPT_PAUSE`]).
    accept_paused_until: Option<Instant>,
    /// How long to poll for events before sleeping (`edge.busy_poll_us`).
    busy_poll: Duration,
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

impl LoopIo {
    /// `epoll_wait` into `events`, waiting up to `timeout` ms (-1: no
    /// limit, 0: no wait).
    fn wait(&self, events: &mut [libc::epoll_event], timeout: i32) -> i32 {
        // SAFETY: `events` is a live buffer of `events.len()` entries.
        unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len().min(i32::MAX as usize) as i32,
                timeout,
            )
        }
    }
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
        busy_poll: Duration,
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
            listener: None,
            hand_back: None,
            watch_failing: false,
            accept_paused_until: None,
            busy_poll,
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

    fn run(mut self, running: &AtomicUsize) {
        // However the thread ends (it should not: a panic serving a
        // connection closes only that one), the connections it held are
        // closed when the loop is dropped; the last loop to end takes the
        // edge down, for its supervisor to start again.
        struct Ended<'a>(&'a AtomicUsize);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
                    tracing::error!(
                        "the last redirect loop ended: nothing accepts cleartext connections; exiting"
                    );
                    std::process::exit(1);
                }
                tracing::error!("a redirect loop ended; the others go on");
            }
        }
        let _ended = Ended(running);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let tick = self.tick();
        // The time of the last wake-up, which the next timeout counts from
        // (so a wait can end up to one batch's work late; a sweep tick is
        // at least 10 ms): one clock read per `epoll_wait`, not two.
        let mut now = Instant::now();
        let mut next_sweep = now + tick;
        loop {
            // Woken for the next sweep while connections are held, and
            // for the end of a pause in accepting.
            let wake_at = match (self.live, self.accept_paused_until) {
                (0, None) => None,
                (0, Some(resume)) => Some(resume),
                (_, resume) => Some(resume.map_or(next_sweep, |r| r.min(next_sweep))),
            };
            let timeout = wake_at.map_or(-1, |at| {
                let left = at.saturating_duration_since(now);
                left.as_millis().min(i32::MAX as u128) as i32 + 1
            });
            // With connections held, their next requests are polled for
            // a while before the thread sleeps (`edge.busy_poll_us`), not
            // past the time the loop is due to wake anyway.
            let polled = if self.live > 0 && !self.busy_poll.is_zero() {
                let until = Instant::now() + self.busy_poll;
                self.poll_for(&mut events, wake_at.map_or(until, |at| at.min(until)))
            } else {
                0
            };
            let n = if polled > 0 {
                polled
            } else {
                self.io.wait(&mut events, timeout)
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
                } else if token == LISTEN {
                    self.accept(now);
                } else {
                    self.ready_guarded(token, flags, now);
                }
            }
            // After the batch: a connection whose next request came in it
            // has been served, not closed as idle.
            let stopping = woken && self.stopping.load(Ordering::SeqCst);
            if stopping {
                self.stop_accepting();
            }
            if stopping || now >= next_sweep {
                if self.live > 0 {
                    self.sweep(now);
                }
                next_sweep = now + tick;
            }
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.resume_accepting();
            }
        }
    }

    /// Polls for events until some come or `until` passes: how many came
    /// (0: none, or an error the blocking wait that follows will report).
    fn poll_for(&self, events: &mut [libc::epoll_event], until: Instant) -> i32 {
        loop {
            let n = self.io.wait(events, 0);
            if n > 0 {
                self.io.fast.metrics.redirect_loop_busy_poll_hits.inc();
                return n;
            }
            if n < 0 || Instant::now() >= until {
                return 0;
            }
            std::hint::spin_loop();
        }
    }

    /// Serves a connection's event; a panic serving it (a bug) closes that
    /// connection, not the loop and all of its others.
    fn ready_guarded(&mut self, token: u64, flags: u32, now: Instant) {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.ready(token, flags, now)
        }));
        if served.is_err() {
            tracing::error!("redirect loop: a connection's request panicked; closed");
            self.remove(token as u32 as usize);
        }
    }

    fn take_inbox(&mut self) {
        if let Some(listener) = self.inbox.take() {
            self.watch_listener(listener);
        }
    }

    /// Starts accepting from `listener` (not once the edge is stopping). A
    /// failure (no memory for the epoll entry) is retried after
    /// [`ACCEPT_PAUSE`], as a failed accept is.
    fn watch_listener(&mut self, listener: Arc<Listener>) {
        if self.stopping.load(Ordering::SeqCst) || self.listener.is_some() {
            return;
        }
        let watched = epoll_ctl(
            self.io.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            listener.socket.as_raw_fd(),
            LISTEN_EVENTS,
            LISTEN,
        );
        if self.hand_back.is_none() {
            self.hand_back = Some((listener.back.clone(), listener.runtime.clone()));
        }
        self.listener = Some(listener);
        match watched {
            Ok(()) => self.watch_failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.watch_failing, true) {
                    tracing::error!(
                        "redirect loop: watching the listener: {e}; retrying every {} ms",
                        ACCEPT_PAUSE.as_millis()
                    );
                }
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            }
        }
    }

    /// Accepts what the listener has, up to [`ACCEPTS_PER_WAKE`], and
    /// serves each connection's first request if it has come (it usually
    /// comes with the connection: no second wait for it).
    fn accept(&mut self, now: Instant) {
        // The listener stays open meanwhile: `self.listener` holds it.
        let Some(listening) = self.listener.as_ref().map(|l| l.socket.as_raw_fd()) else {
            return;
        };
        for _ in 0..ACCEPTS_PER_WAKE {
            let (fd, peer) = match accept(listening) {
                Ok(accepted) => accepted,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    // A connection that failed before it was taken, or a
                    // network error passed on (accept(2) says to retry).
                    Some(
                        libc::EINTR
                        | libc::ECONNABORTED
                        | libc::EPROTO
                        | libc::EPERM
                        | libc::ENETDOWN
                        | libc::ENOPROTOOPT
                        | libc::EHOSTDOWN
                        | libc::ENONET
                        | libc::EHOSTUNREACH
                        | libc::EOPNOTSUPP
                        | libc::ENETUNREACH,
                    ) => continue,
                    _ => {
                        tracing::warn!(
                            "redirect loop: accept: {e}; accepting again in {} ms",
                            ACCEPT_PAUSE.as_millis()
                        );
                        self.pause_accepting(now);
                        return;
                    }
                },
            };
            self.io.fast.metrics.redirect_loop_accepts.inc();
            let deadline = now + self.io.header_timeout;
            if let Some(token) = self.register(fd, peer, deadline) {
                self.ready_guarded(token, 0, now);
            }
        }
    }

    fn pause_accepting(&mut self, now: Instant) {
        if let Some(listener) = &self.listener {
            self.io.unwatch(listener);
            self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        }
    }

    fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        if let Some(listener) = self.listener.take() {
            self.watch_listener(listener);
        }
    }

    /// The edge is shutting down: new connections are left in the socket,
    /// for the process that takes it over (a graceful upgrade) or for the
    /// kernel to refuse once the socket closes (when the last loop lets go
    /// of it here).
    fn stop_accepting(&mut self) {
        if let Some(listener) = self.listener.take()
            && self.accept_paused_until.take().is_none()
        {
            self.io.unwatch(&listener);
        }
    }

    /// Takes a new connection into the loop, its header clock running to
    /// `deadline`. Its token, or `None` when it cannot be watched (it then
    /// goes to Pingora).
    fn register(&mut self, fd: OwnedFd, peer: Option<IpAddr>, deadline: Instant) -> Option<u64> {
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
            fd.as_raw_fd(),
            READ_EVENTS,
            token,
        ) {
            tracing::debug!("redirect loop: adding a connection: {e}; back to Pingora");
            self.free.push(idx as u32);
            self.give_back(fd, BytesMut::new());
            return None;
        }
        self.slots[idx].conn = Some(Conn {
            fd,
            token,
            peer,
            head: BytesMut::new(),
            scan: HeaderScan::default(),
            deadline,
            pending: Vec::new(),
            sent: 0,
            close_after: false,
            first: true,
        });
        self.live += 1;
        self.io.fast.metrics.redirect_loop_connections.inc();
        Some(token)
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
                    self.give_back(conn.fd, head);
                }
            }
        }
    }

    /// Hands a connection (and the bytes read from it) to Pingora.
    fn give_back(&self, fd: OwnedFd, head: BytesMut) {
        // Set before the first accept, so always there for a connection.
        if let Some((back, runtime)) = &self.hand_back {
            back.hand_back(fd, head, runtime);
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
            // Between requests (a new connection waits for its first one).
            let idle = |c: &Conn| !c.first && c.head.is_empty() && c.pending.is_empty();
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

/// The listener: level-triggered (a loop that accepted its share leaves the
/// rest reported), and one loop woken per connection, not all of them.
const LISTEN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
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
                Ok(true) if conn.close_after => return Outcome::Close,
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
                    // The first byte of a later request starts its header's
                    // clock (a first request's has run since the accept).
                    if !conn.first {
                        conn.deadline = now + self.header_timeout;
                    }
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
            conn.first = false;
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
                return Outcome::Close;
            }
            if !more {
                if peer_done {
                    // Answered; the client will send nothing more.
                    return Outcome::Close;
                }
                return Outcome::Keep;
            }
        }
    }

    /// Takes the listener out of the loop's epoll set.
    fn unwatch(&self, listener: &Listener) {
        let _ = epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            listener.socket.as_raw_fd(),
            0,
            0,
        );
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

/// Accepts a connection from `listener`: its socket (non-blocking) and the
/// peer's address.
fn accept(listener: RawFd) -> std::io::Result<(OwnedFd, Option<IpAddr>)> {
    // SAFETY: an all-zero sockaddr_storage is a valid value of it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: accept4(2) writing at most `len` bytes into `addr`, live and
    // that large, and the length into `len`. A plain system call, as for
    // `recv` and `send`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_accept4,
            libc::c_long::from(listener),
            (&mut addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr>(),
            &mut len as *mut libc::socklen_t,
            libc::c_long::from(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC),
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: a new socket, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    Ok((fd, peer_ip(&addr)))
}

/// The IP address in a `sockaddr_storage` that accept(2) filled.
fn peer_ip(addr: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it holds a sockaddr_in, which is
            // smaller than sockaddr_storage and needs no more alignment.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::from(a.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: no memory arguments; an error (peer gone) changes nothing.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}
