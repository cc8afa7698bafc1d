//! The `uload` command line. `main.rs` only calls [`main`]; each subcommand
//! lives in its own module and returns a [`CliError`] that names what failed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod api_key;
mod backup;
mod export;
mod import;
mod inspect;
mod serve;

/// uLoad edge: a redirect edge that serves every short link from memory.
#[derive(Debug, Parser)]
#[command(name = "uload", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The data dir argument every store command takes.
#[derive(Debug, clap::Args)]
struct DataDirArg {
    /// Data directory (link log, snapshots, manifest).
    #[arg(long, env = "ULOAD_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
}

impl DataDirArg {
    /// The data dir, which must exist: the commands that only read or
    /// compact one must not take a mistyped path for an empty data dir (or
    /// make one there). `import` alone may start a new one.
    fn existing(&self) -> Result<&std::path::Path, CliError> {
        if !self.data_dir.is_dir() {
            return Err(CliError::new(format!(
                "{}: not a directory",
                self.data_dir.display()
            )));
        }
        Ok(&self.data_dir)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import links from a TSV (code<TAB>url), CSV (with a header) or JSON-lines file.
    Import(import::ImportArgs),
    /// Export every link as JSON lines (the format `import` reads back).
    Export(export::ExportArgs),
    /// Merge the snapshot and the log into a new snapshot and trim the log.
    Compact {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Check a data dir and print its format versions, sequences, counts and checksums.
    Inspect(inspect::InspectArgs),
    /// Take a consistent online backup of a data dir (the admin may keep writing).
    Backup(backup::BackupArgs),
    /// Check a backup against its BACKUP file, its snapshot and its log; non-zero exit on any problem.
    VerifyBackup(backup::VerifyArgs),
    /// Verify a backup, then restore it into a new data dir.
    Restore(backup::RestoreArgs),
    /// Run the edge: redirects from memory, /api proxied to the admin, /health.
    Edge(serve::EdgeArgs),
    /// Run the admin: the link management API, the only writer of the data dir.
    Admin(serve::AdminArgs),
    /// Run admin and edge together on this machine, with a local data dir.
    Up(serve::UpArgs),
    /// Validate configuration files; names the file, key and problem on error.
    CheckConfig(serve::CheckConfigArgs),
    /// Make a new API key and print it with the hash admin.api_key_hashes takes.
    ApiKey(api_key::ApiKeyArgs),
}

/// A failed command: the message for stderr and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub status: u8,
}

impl CliError {
    /// A failure with exit status 1.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            status: 1,
        }
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::new(e)
    }
}

/// Parses the arguments, runs the command, and turns its result into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(args) => import::run(args),
        Command::Export(args) => export::run(args),
        Command::Compact { dir } => compact(dir),
        Command::Inspect(args) => inspect::run(args),
        Command::Backup(args) => backup::run_backup(args),
        Command::VerifyBackup(args) => backup::run_verify(args),
        Command::Restore(args) => backup::run_restore(args),
        Command::Edge(args) => serve::edge(args),
        Command::Admin(args) => serve::admin(args),
        Command::Up(args) => serve::up(args),
        Command::CheckConfig(args) => serve::check_config(args),
        Command::ApiKey(args) => api_key::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uload: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}

fn compact(dir: DataDirArg) -> Result<(), CliError> {
    let store = crate::store::Store::open(dir.existing()?, Default::default())?;
    let report = store.compact()?;
    match &report.snapshot {
        Some(info) => println!(
            "compacted {} log records into {} ({} links, sequence {}); removed {} old files",
            report.records,
            info.path.display(),
            info.header.link_count,
            info.header.seq,
            report.removed.len()
        ),
        None => println!(
            "nothing new to compact; removed {} old files",
            report.removed.len()
        ),
    }
    Ok(())
}
