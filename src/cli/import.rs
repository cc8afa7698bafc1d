//! `uload import FILE`: loads links into a new or existing data dir.
//!
//! Every row is validated; refused rows are reported with their line, field
//! and reason, and the rest are imported (with `--strict`, nothing is
//! imported when any row is refused). Codes already in the store are refused
//! unless `--overwrite`. The accepted links are appended to the log in
//! batches (one fsync per batch), then compacted into a snapshot.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use super::{CliError, DataDirArg};
use crate::interchange::{Format, RowError, read_links};
use crate::store::{LogOp, Store, record::now_ms};

/// Links appended per log append (and so per fsync).
const BATCH: usize = 10_000;
/// Refused rows printed before the summary (all are counted).
const SHOWN_ERRORS: usize = 50;
/// Exit status when some rows were refused but the rest were imported.
pub const EXIT_ROWS_REFUSED: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// File to import (.tsv, .csv, .jsonl; or say --format).
    file: PathBuf,
    #[command(flatten)]
    dir: DataDirArg,
    /// Input format: tsv, csv or jsonl (default: from the file's extension).
    #[arg(long)]
    format: Option<Format>,
    /// Replace links whose codes already exist (default: refuse those rows).
    #[arg(long)]
    overwrite: bool,
    /// Import nothing if any row is refused.
    #[arg(long)]
    strict: bool,
}

pub fn run(args: ImportArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let file_name = args.file.display().to_string();
    let format = args
        .format
        .or_else(|| Format::from_path(&args.file))
        .ok_or_else(|| {
            CliError::new(format!(
                "{file_name}: cannot tell the format from the extension; pass --format tsv|csv|jsonl"
            ))
        })?;
    let input = File::open(&args.file).map_err(|e| CliError::new(format!("{file_name}: {e}")))?;
    // Take the writer lock before reading what exists, so nothing changes under us.
    let store = Store::open(&args.dir.data_dir, Default::default())?;
    let existing = store.dir().load_view(true)?;

    let mut ops = Vec::new();
    let mut seen = HashSet::new();
    let mut refused: Vec<RowError> = Vec::new();
    let mut refused_count = 0u64;
    let mut refuse = |e: RowError| {
        refused_count += 1;
        if refused.len() < SHOWN_ERRORS {
            refused.push(e);
        }
    };
    read_links(
        BufReader::with_capacity(1 << 20, input),
        format,
        now_ms(),
        |line, row| match row {
            Err(e) => refuse(e),
            Ok(link) => {
                if !seen.insert(link.code.clone()) {
                    refuse(RowError {
                        line,
                        field: "code".into(),
                        message: format!("{:?} appears earlier in this file", link.code),
                    });
                } else if !args.overwrite && existing.get(link.code.as_bytes()).is_some() {
                    refuse(RowError {
                        line,
                        field: "code".into(),
                        message: format!(
                            "{:?} already exists (use --overwrite to replace it)",
                            link.code
                        ),
                    });
                } else {
                    ops.push(LogOp::Put(link));
                }
            }
        },
    )
    .map_err(|e| CliError::new(format!("{file_name}: {e}")))?;

    for e in &refused {
        eprintln!("{file_name}: {e}");
    }
    if refused_count as usize > refused.len() {
        eprintln!(
            "{file_name}: ... and {} more refused rows",
            refused_count as usize - refused.len()
        );
    }
    if args.strict && refused_count > 0 {
        return Err(CliError::new(format!(
            "{file_name}: {refused_count} rows refused; nothing imported (--strict)"
        )));
    }
    let first_seq = store.log().durable_seq() + 1;
    for batch in ops.chunks(BATCH) {
        store.append(batch)?;
    }
    let last_seq = store.log().durable_seq();
    let report = store.compact()?;
    let links = report
        .snapshot
        .as_ref()
        .map_or(existing.len(), |s| s.header.link_count);
    let sequences = if ops.is_empty() {
        String::new()
    } else {
        format!(" (sequences {first_seq}..={last_seq})")
    };
    println!(
        "{file_name}: imported {} links{sequences}, refused {refused_count} rows; \
         the store holds {links} links; {:.2} s",
        ops.len(),
        started.elapsed().as_secs_f64()
    );
    if refused_count > 0 {
        return Err(CliError {
            message: format!(
                "{file_name}: {refused_count} rows refused (listed above); the rest were imported"
            ),
            status: EXIT_ROWS_REFUSED,
        });
    }
    Ok(())
}
