//! The `uload` command line.
