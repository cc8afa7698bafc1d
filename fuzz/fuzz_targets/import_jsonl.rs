//! Fuzz target: the bytes of a JSON-lines import file (`uload export`'s format).
//!
//! `read_links` must never panic; every row is a valid link (which survives
//! a log frame and an export/re-import round trip) or a refusal naming a
//! line of the file. The checks live in `format_checks.rs`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod format_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| format_checks::check_import(
    uload::interchange::Format::JsonLines,
    data
));
