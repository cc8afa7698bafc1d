//! The log follower as a Pingora background service: polls the data dir off
//! the request path and publishes new views into the hot table.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::store::LogFollower;

/// Runs `LogFollower::poll_once` every `interval` until shutdown.
pub struct FollowerService {
    pub follower: Mutex<LogFollower>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for FollowerService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            // A poll reads a few files and may verify a new snapshot's
            // checksum. It runs on this service's own runtime thread, so
            // blocking here never delays a request (readers use the ArcSwap).
            let result = self.follower.lock().map(|mut f| f.poll_once());
            if result.is_err() {
                tracing::error!("log follower state poisoned; stopping the follower");
                return;
            }
        }
    }
}
