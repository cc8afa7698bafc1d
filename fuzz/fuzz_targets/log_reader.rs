//! Fuzz target: the bytes of one link log segment file.
//!
//! Runs `scan_segment`, `valid_frame_follows`, `decode_frame`, `replay` and
//! `LogTail::poll` on the input and checks that nothing panics, that the
//! readers agree with each other and that every frame the scanner accepts
//! re-encodes to exactly its original bytes. The checks live in `checks.rs`,
//! shared with `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_log_segment(data));
