//! The log follower as a Pingora background service: reads the data dir off
//! the request path and publishes new views into the hot table.
//!
//! It polls when the data dir changes (inotify on the data dir, `log/` and
//! `snapshots/`), at most once per `interval`, and otherwise only every
//! [`SAFETY_POLL`]; an idle edge does no work. Where inotify is unavailable
//! (or fails) it polls every `interval`, as before.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use crate::store::LogFollower;
use crate::store::follower::FollowerStats;
use crate::sys::DirWatch;

use super::health::DiskGauge;

/// With change notifications on, the follower still polls this often, in
/// case a change was missed (a file system that does not report them).
pub const SAFETY_POLL: Duration = Duration::from_millis(500);

/// Runs `LogFollower::poll_once` when the data dir changes (at most every
/// `interval`), or every `interval` without change notifications, until
/// shutdown.
pub struct FollowerService {
    pub follower: Mutex<LogFollower>,
    /// The follower's counters, where a stop is reported.
    pub stats: Arc<FollowerStats>,
    pub interval: Duration,
    /// Directories whose changes wake the follower; empty: poll every
    /// `interval`.
    pub watch_dirs: Vec<PathBuf>,
    /// The data dir's disk space for `/health`, measured here after the
    /// reads (at most once a second), off the request path.
    pub disk: Option<(Arc<DiskGauge>, PathBuf)>,
}

impl FollowerService {
    /// Says that change notifications failed and polling takes over.
    fn fall_back(&self, e: &std::io::Error) {
        tracing::warn!(error = %e, "log follower: change notifications failed; polling every {:?}", self.interval);
    }

    fn watch(&self) -> Option<AsyncFd<DirWatch>> {
        if self.watch_dirs.is_empty() {
            return None;
        }
        let dirs: Vec<&std::path::Path> = self.watch_dirs.iter().map(PathBuf::as_path).collect();
        let registered = DirWatch::new(&dirs).and_then(|watch| {
            // SAFETY: the DirWatch owns its descriptor (an OwnedFd it never
            // replaces), so it stays open and the same for as long as the
            // AsyncFd holds it.
            unsafe { AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into())
        });
        match registered {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(error = %e, "log follower: no change notifications; polling every {:?}", self.interval);
                None
            }
        }
    }
}

/// The longest rest of an interval slept on the follower's thread (see
/// `start`); longer ones wait on tokio's timer.
const PRECISE_WAIT_MAX: Duration = Duration::from_millis(20);

#[async_trait]
impl BackgroundService for FollowerService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut watch = self.watch();
        // Every directory watched, or some missing (rewatch on each wake).
        let mut all_watched = watch
            .as_ref()
            .is_some_and(|w| w.get_ref().rewatch() == w.get_ref().dirs());
        loop {
            // A poll reads a few files and may verify a new snapshot's
            // checksum. It runs on this service's own runtime thread, so
            // blocking here never delays a request (readers use the ArcSwap).
            let polled = Instant::now();
            // A poll that panics (a bug) may leave the follower's working
            // view half changed: it stops, and says so (readiness fails
            // after `follower_stall`), rather than going on from there or
            // dying unseen with its task.
            let polled_ok = self.follower.lock().is_ok_and(|mut f| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.poll_once())).is_ok()
            });
            if let Some((disk, dir)) = &self.disk {
                self.stats.reading(|| disk.refresh_if_due(dir));
            }
            if !polled_ok {
                let why = "the log follower stopped: a poll panicked; serving the last view";
                tracing::error!("{why}");
                self.stats.stopped(why);
                return;
            }
            let next = polled + self.interval;
            let Some(fd) = watch.as_ref() else {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
                continue;
            };
            // Wait for a change (or the safety poll), then for the rest of
            // `interval`: a burst of writes is read in batches.
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(SAFETY_POLL.max(self.interval)) => {}
                ready = fd.readable() => match ready {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        self.fall_back(&e);
                        watch = None;
                    }
                },
            }
            // The rest of `interval`, slept on this service's own thread
            // when it is short: tokio's timer rounds a wait up to the next
            // millisecond, and its driver's wait again, which made the
            // default 2 ms a 3 ms wait at the median and over 5 ms at the
            // 99th percentile under load (a record written just after a
            // read waited that long to be served); a thread sleep ends
            // within tens of microseconds of its time. A long interval
            // waits on tokio, where a shutdown ends it.
            let left = next.saturating_duration_since(Instant::now());
            if left <= PRECISE_WAIT_MAX {
                std::thread::sleep(left);
            } else {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
            }
            if let Some(fd) = watch.as_ref() {
                // Everything up to now is read by the poll that follows.
                match fd.get_ref().drain() {
                    Ok(drained) => {
                        if drained.dirs_changed || !all_watched {
                            all_watched = fd.get_ref().rewatch() == fd.get_ref().dirs();
                        }
                    }
                    Err(e) => {
                        self.fall_back(&e);
                        watch = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower whose state a panic left poisoned stops and is reported
    /// stuck, with the reason (readiness fails after the stall time).
    #[test]
    fn a_stopped_follower_is_reported_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let follower = LogFollower::open(dir.path()).unwrap();
        let stats = follower.stats();
        let service = Arc::new(FollowerService {
            follower: Mutex::new(follower),
            stats: stats.clone(),
            interval: Duration::from_millis(1),
            watch_dirs: Vec::new(),
            disk: None,
        });
        let poisoner = service.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.follower.lock().unwrap();
            panic!("poison the follower's lock");
        })
        .join();
        assert!(service.follower.is_poisoned());
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Returns by itself (a running follower would wait for shutdown).
        runtime.block_on(service.start(rx));
        assert_ne!(
            stats
                .stuck_since_ms
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let why = stats.last_error.lock().unwrap().clone().unwrap_or_default();
        assert!(why.contains("stopped"), "{why}");
    }
}
