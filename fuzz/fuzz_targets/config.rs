//! Fuzz target: the bytes of a YAML configuration file.
//!
//! `Config::from_yaml_str` must never panic (refusing is fine), and a
//! configuration it accepts holds the invariants its validation promises.
//! The checks live in `format_checks.rs`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]

#[allow(dead_code)]
mod format_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| format_checks::check_config(data));
