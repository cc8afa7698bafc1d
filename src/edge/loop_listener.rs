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
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::HttpServerApp;
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
        let socket = match listening_socket(self.listen, fds.as_ref()) {
            Ok(socket) => socket,
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
            socket,
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
        self.limits.cleanup().await;
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
fn listening_socket(
    addr: SocketAddr,
    fds: Option<&ListenFds>,
) -> std::io::Result<std::net::TcpListener> {
    let key = addr.to_string();
    let inherited = fds.and_then(|fds| fds.lock().get(&key).copied());
    let listener = match inherited {
        // SAFETY: the table's listening socket, received from the process
        // this one upgrades; this process owns it from here (the table keeps
        // only its number, to pass on in an upgrade of its own).
        Some(fd) => unsafe { std::net::TcpListener::from_raw_fd(fd) },
        None => {
            // std sets SO_REUSEADDR, as Pingora does.
            let listener = std::net::TcpListener::bind(addr)?;
            if let Some(fds) = fds {
                fds.lock().add(key, listener.as_raw_fd());
            }
            listener
        }
    };
    listener.set_nonblocking(true)?;
    // A longer queue than std's 128 (Linux takes a second listen(2) as a
    // new backlog, as Pingora relies on for inherited sockets too).
    // SAFETY: no memory arguments.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // TCP_NODELAY, as Pingora sets on every stream it accepts; Linux copies
    // it from the listener to each accepted socket, so once here rather
    // than a call per connection.
    super::set_tcp_option(listener.as_raw_fd(), libc::TCP_NODELAY, 1)?;
    Ok(listener)
}
