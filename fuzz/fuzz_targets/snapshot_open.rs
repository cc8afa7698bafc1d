//! Fuzz target: the bytes of one snapshot file.
//!
//! Opens the input with `Snapshot::from_bytes` (with and without checksum
//! verification), iterates every record and looks codes up; nothing may panic
//! and lookups may only return the code asked for. A snapshot that opens
//! verified and whose records are all valid is rewritten with
//! `write_snapshot`, and the rewritten file must find every code. The checks
//! live in `checks.rs`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_snapshot(data));
