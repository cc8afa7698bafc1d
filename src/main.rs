//! The `uload` binary: a thin wrapper around [`uload::cli`].
fn main() -> std::process::ExitCode {
    uload::cli::main()
}
