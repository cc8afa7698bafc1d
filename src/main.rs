//! The `uload` binary: a thin wrapper around [`uload::cli`].
fn main() -> std::process::ExitCode {
    uload::sys::started(); // uptime counts from here
    uload::cli::main()
}
