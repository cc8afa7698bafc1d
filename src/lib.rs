//! uLoad edge: a redirect edge for a URL shortener that answers every short
//! link from memory, so that nothing remote can take redirects down.
//!
//! - [`store`]: the link store (append-only link log, memory-mapped
//!   snapshots, lock-free hot table). Format: `docs/storage.md`.
//! - [`admin`]: the link management HTTP API (`docs/api.md`).
//! - [`cli`]: the `uload` command line (the binary is a thin wrapper).

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
