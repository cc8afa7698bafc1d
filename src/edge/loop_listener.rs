//! The cleartext listener, when the redirect loops serve it: the loops
//! accept its connections themselves and answer their requests with the
//! fast path, with no tokio task, Pingora stream or header buffer per
//! connection (a one-click client's whole cost is `accept4`, `epoll_ctl`,
//! `recvfrom`, `sendto` and `close`). A request the fast path does not
//! answer goes to Pingora with its connection, on this service's runtime,
//! and is served as any other (`ClientLimits::serve`).
//!
//! The listening socket lives in Pingora's table of listening sockets
//! under `edge.listen`, as Pingora's own listeners do: a graceful upgrade
//! (`-u`) hands it to the new process with the others, and the new process
//! takes it from the table instead of binding (whichever kind of listener,
//! Pingora's or this one, each side runs). Once the edge starts shutting
//! down, the loops stop accepting and let go of the socket, which closes
//! it in this process: after a hand-over, the connections still waiting in
//! its queue are the new process's; after SIGTERM, new clients are refused
//! at once rather than left waiting out the grace period.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service;

use super::client_limits::{ClientLimits, shutdown_signal};
use super::redirect_loop::Listener;

/// Pingora's backlog for its listeners, kept for this one.
const BACKLOG: libc::c_int = 65_535;

/// The service that owns the cleartext listener while the loops serve it.
pub struct LoopListener<A> {
    listen: SocketAddr,
    limits: Arc<ClientLimits<A>>,
}

impl<A> LoopListener<A> {
    pub fn new(listen: SocketAddr, limits: Arc<ClientLimits<A>>) -> Self {
        Self { listen, limits }
    }
}

#[async_trait]
impl<A> Service for LoopListener<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(loops) = self.limits.loops() else {
            return;
        };
        let fd = match listening_socket(self.listen, fds.as_ref()) {
            Ok(fd) => fd,
            Err(e) => {
                // What Pingora's listeners do on a bind failure is panic
                // their thread and leave a process that serves nothing; an
                // exit lets a supervisor see it (`edge::build` has checked
                // the address is free, so this is a race with another
                // process).
                tracing::error!("edge.listen {}: {e}", self.listen);
                std::process::exit(1);
            }
        };
        let listener = Listener {
            fd,
            back: self.limits.back(&shutdown),
            runtime: tokio::runtime::Handle::current(),
        };
        if !loops.accept_from(listener, &shutdown) {
            tracing::error!(
                "edge.listen {}: the redirect loops could not start; nothing accepts connections",
                self.listen
            );
            std::process::exit(1);
        }
        tracing::info!("redirect loops accepting on {}", self.listen);
        shutdown_signal(shutdown).await;
        // What Pingora's service does once it stops listening.
        ServerApp::cleanup(&*self.limits).await;
    }

    fn name(&self) -> &str {
        "redirect loops' listener"
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.listen.to_string()])
    }
}

/// The listening socket for `addr`: the one in Pingora's table (passed on
/// by the process this one upgrades), else a new one, put in the table.
/// Non-blocking either way; the loops close it when they let go of it.
fn listening_socket(addr: SocketAddr, fds: Option<&ListenFds>) -> std::io::Result<RawFd> {
    let key = addr.to_string();
    let inherited = fds.and_then(|fds| fds.lock().get(&key).copied());
    let fd = match inherited {
        Some(fd) => fd,
        None => {
            // std sets SO_REUSEADDR, as Pingora does.
            let listener = std::net::TcpListener::bind(addr)?;
            let fd = listener.into_raw_fd();
            if let Some(fds) = fds {
                fds.lock().add(key, fd);
            }
            fd
        }
    };
    // SAFETY: `fd` is a listening socket this process keeps open; the
    // borrowed TcpListener is turned back into the raw fd, not dropped.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let set = listener.set_nonblocking(true);
    let fd = listener.into_raw_fd();
    set?;
    // A longer queue than std's 128 (Linux takes a second listen(2) as a
    // new backlog, as Pingora relies on for inherited sockets too).
    // SAFETY: no memory arguments.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // TCP_NODELAY, as Pingora sets on every stream it accepts; Linux copies
    // it from the listener to each accepted socket, so once here rather
    // than a call per connection.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
