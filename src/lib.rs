//! uLoad edge: a redirect edge for a URL shortener that answers every short
//! link from memory, so that nothing remote can take redirects down.
//!
//! - [`store`]: the link store (append-only link log, memory-mapped
//!   snapshots, lock-free hot table). Format: `docs/storage.md`.
//! - [`admin`]: the link management HTTP API (`docs/api.md`).
//! - [`cli`]: the `uload` command line (the binary is a thin wrapper).
//!
//! Runnable examples: `cargo run --example hot_table` (a writer, a log
//! follower and a lock-free reader on one data dir, across a compaction) and
//! `cargo run --example admin_api` (the admin API in-process on a loopback
//! port, with `curl` lines to try).

pub mod admin;
pub mod cli;
pub mod config;
pub mod edge;
pub mod interchange;
pub mod metrics;
pub mod ratelimit;
pub mod state_file;
pub mod store;
pub mod sys;
