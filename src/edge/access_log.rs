//! The edge's access log: one JSON object per line, written by a background
//! thread so that a slow disk never delays a response. When the writer falls
//! behind by more than `access_log.buffer_lines`, lines are dropped and
//! counted (`access_log_dropped_total`), never waited for; so are the lines
//! of a batch that could not be written (a full disk), and such a batch
//! leaves nothing in the file (no part of a line).
//!
//! A line: `{"ts":"2026-11-26T21:05:03.120Z","client":"203.0.113.7",
//! "method":"GET","path":"/abc1234","status":302,"route":"redirect",
//! "duration_us":41,"user_agent":"curl/8.5.0"}`. The query string is left
//! out (it can carry personal data); every field is JSON-escaped, so a
//! hostile path cannot forge a line.
//!
//! Turn it on with `access_log.path` (a file, opened for append, so
//! `logrotate`'s `copytruncate` works); empty turns it off.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use prometheus::IntCounter;
use serde::Serialize;

/// One request, as logged. Borrowed: building it copies nothing.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub ts: &'a str,
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<&'a str>,
}

/// The sending half. Cheap to share behind the proxy; the writer thread
/// stops when this is dropped.
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    dropped: IntCounter,
    /// The file and the receiving half, until the writer thread takes them.
    writer: Mutex<Option<(std::fs::File, Receiver<Vec<u8>>)>>,
}

impl AccessLog {
    /// An access log on a file opened by [`open_file`], its writer not
    /// started: lines queue (up to `buffer_lines`) until
    /// [`AccessLog::start_writer`]. The edge opens the file before taking a
    /// running edge's sockets, and starts the writer from a service, once
    /// Pingora runs: a thread started before then would not survive `-d`
    /// (Pingora forks into a daemon when it starts running).
    pub fn new(file: std::fs::File, buffer_lines: usize, dropped: IntCounter) -> Self {
        let (tx, rx) = sync_channel(buffer_lines.max(1));
        Self {
            tx,
            dropped,
            writer: Mutex::new(Some((file, rx))),
        }
    }

    /// [`AccessLog::new`] with its writer started.
    pub fn start(
        file: std::fs::File,
        buffer_lines: usize,
        dropped: IntCounter,
    ) -> std::io::Result<Self> {
        let log = Self::new(file, buffer_lines, dropped);
        log.start_writer()?;
        Ok(log)
    }

    /// Starts the writer thread (once: later calls do nothing).
    pub fn start_writer(&self) -> std::io::Result<()> {
        let Some((file, rx)) = self.writer.lock().ok().and_then(|mut w| w.take()) else {
            return Ok(());
        };
        let lost = self.dropped.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(file, rx, lost))?;
        Ok(())
    }

    /// Queues one record; drops it (and counts the drop) if the writer is behind.
    pub fn log(&self, record: &AccessRecord<'_>) {
        let mut line = Vec::with_capacity(192);
        if serde_json::to_writer(&mut line, record).is_err() {
            return;
        }
        line.push(b'\n');
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Starts the access log's writer when the server's services start, after
/// Pingora's fork into a daemon (`-d`), which a thread started before it
/// would not survive.
pub struct WriterService(pub std::sync::Arc<AccessLog>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for WriterService {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        if let Err(e) = self.0.start_writer() {
            tracing::error!(error = %e, "access log: cannot start its writer; lines are being lost");
        }
    }
}

/// Opens (creates) the access log at `path` for appending, and its
/// directory if need be.
pub fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Most bytes of queued lines gathered into one write.
const BATCH_BYTES: usize = 64 * 1024;

/// Writes the queued lines in batches, each appended whole or not at all
/// ([`append_whole`]); the lines of a batch that could not be written are
/// counted in `lost` (`access_log_dropped_total`).
fn write_lines(mut file: std::fs::File, rx: Receiver<Vec<u8>>, lost: IntCounter) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut failed = false;
    while let Ok(line) = rx.recv() {
        // Gather what is queued: a burst costs one write, and lines reach
        // the file within one batch.
        batch.clear();
        batch.extend_from_slice(&line);
        let mut lines = 1;
        while batch.len() < BATCH_BYTES
            && let Ok(line) = rx.try_recv()
        {
            batch.extend_from_slice(&line);
            lines += 1;
        }
        match (append_whole(&mut file, &batch), failed) {
            (Err(e), was_failing) => {
                lost.inc_by(lines);
                if !was_failing {
                    tracing::error!(error = %e, "access log: write failed; lines are being lost");
                    failed = true;
                }
            }
            (Ok(()), true) => {
                tracing::info!("access log: writing again");
                failed = false;
            }
            (Ok(()), false) => {}
        }
    }
}

/// Appends `batch` (whole lines) to `file`, or nothing: a write that fails
/// partway (a disk that fills in the middle of a long line) is cut back to
/// where it began, so that the log never holds part of a line for the next
/// one to be glued to.
fn append_whole(file: &mut std::fs::File, batch: &[u8]) -> std::io::Result<()> {
    let before = file.metadata()?.len();
    file.write_all(batch).inspect_err(|_| {
        let _ = file.set_len(before);
    })
}

/// RFC 3339 UTC with milliseconds for `ms` since the epoch.
pub fn timestamp(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let nanos = ((ms % 1000) * 1_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/access.log");
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::start(open_file(&path).unwrap(), 16, dropped.clone()).unwrap();
        let ts = timestamp(1_795_726_533_120);
        log.log(&AccessRecord {
            ts: &ts,
            client: "203.0.113.7",
            method: "GET",
            path: "/a\"}\n{\"forged\":1",
            status: 404,
            route: "not_found",
            duration_us: 41,
            user_agent: Some("curl/8"),
        });
        drop(log);
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.ends_with('\n') {
                break;
            }
            std::thread::yield_now();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["path"], "/a\"}\n{\"forged\":1");
        assert_eq!(v["ts"], "2026-11-26T20:55:33.120Z");
        assert_eq!(dropped.get(), 0);
    }
}
