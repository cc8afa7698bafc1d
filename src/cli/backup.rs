//! `uload backup`, `uload verify-backup` and `uload restore`: the command
//! line of [`crate::store::backup`].

use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::Config;
use crate::store::backup::{self, BackupError, BackupOptions};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// New (or empty) directory to write the backup into.
    dest: PathBuf,
    /// Data directory to back up (default: the config's `data_dir`).
    #[arg(long, conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// Configuration file naming the data dir (default: conf/uload.yaml when
    /// it exists, else built-in defaults; `ULOAD_DATA_DIR` overrides).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Copy the snapshot even when it could be hard-linked.
    #[arg(long)]
    no_link: bool,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The backup directory to check.
    src: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup directory to restore from.
    src: PathBuf,
    /// New (or empty) data directory to create.
    dest_data_dir: PathBuf,
}

fn data_dir(args: &BackupArgs) -> Result<PathBuf, CliError> {
    if let Some(d) = &args.data_dir {
        return Ok(d.clone());
    }
    let default = Path::new("conf/uload.yaml");
    let path = args
        .config
        .as_deref()
        .or_else(|| default.exists().then_some(default));
    Ok(Config::load(path).map_err(CliError::new)?.data_dir)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub fn run_backup(args: BackupArgs) -> Result<(), CliError> {
    let data = data_dir(&args)?;
    let opts = BackupOptions {
        hard_link: !args.no_link,
        ..Default::default()
    };
    let report = backup::backup(&data, &args.dest, &opts).map_err(CliError::new)?;
    let m = &report.manifest;
    let snapshot = match &m.snapshot {
        Some(s) => format!(
            "snapshot {} (sequence {}, {} links, {})",
            s.file,
            s.seq,
            s.links,
            if report.hard_linked {
                "hard-linked"
            } else {
                "copied"
            }
        ),
        None => "no snapshot".to_owned(),
    };
    println!(
        "backup {}: {snapshot} + log up to sequence {}: {} links, {} files, {} written, {} attempt(s), {:.3} s",
        report.dest.display(),
        m.seq,
        m.links,
        m.files.len(),
        mib(report.bytes_copied),
        report.attempts,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

pub fn run_verify(args: VerifyArgs) -> Result<(), CliError> {
    let report = backup::verify_backup(&args.src);
    print!("{}", report.to_text());
    if report.is_ok() {
        Ok(())
    } else {
        Err(CliError::new(format!(
            "{}: {} problem(s) found",
            args.src.display(),
            report.problems.len()
        )))
    }
}

pub fn run_restore(args: RestoreArgs) -> Result<(), CliError> {
    match backup::restore(&args.src, &args.dest_data_dir) {
        Ok(r) => {
            print!("{}", r.verify.to_text());
            println!(
                "restored      {} (sequence {}, {} links, {})",
                r.dest.display(),
                r.seq,
                r.links,
                mib(r.bytes_copied)
            );
            println!(
                "took          {:.3} s (verify {:.3} s, copy {:.3} s, load {:.3} s)",
                r.elapsed.as_secs_f64(),
                r.verify_time.as_secs_f64(),
                r.copy_time.as_secs_f64(),
                r.load_time.as_secs_f64()
            );
            Ok(())
        }
        Err(BackupError::Verification { path, report }) => {
            print!("{}", report.to_text());
            Err(CliError::new(format!(
                "{}: refusing to restore: the backup failed verification ({} problem(s)); {} was not touched",
                path.display(),
                report.problems.len(),
                args.dest_data_dir.display()
            )))
        }
        Err(e) => Err(CliError::new(e)),
    }
}
