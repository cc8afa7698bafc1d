//! Fuzz target: the bytes of a data directory's `MANIFEST` file.
//!
//! `Manifest::decode` must never panic, and a manifest it accepts must encode
//! to text that decodes to the same value. The checks live in
//! `format_checks.rs`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod format_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| format_checks::check_manifest(data));
