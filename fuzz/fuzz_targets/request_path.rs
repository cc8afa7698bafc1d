//! Fuzz target: the request path's own parsing, on arbitrary bytes.
//!
//! The input is `target NUL /path?query` (without a NUL: the request target
//! alone, merged with one of a few fixed link targets). Runs `route`,
//! `split_target` and `location_into` and checks them against their
//! documentation: a redirect names a valid code, the merged `Location` keeps
//! the target's base and fragment, percent-encodes every query byte that
//! could break a header and is deterministic. The checks live in
//! `format_checks.rs`, shared with `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod format_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| format_checks::check_request(data));
