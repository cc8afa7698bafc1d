//! `uload import FILE`: loads links into a new or existing data dir.
//!
//! Every row is validated; refused rows are reported with their line, field
//! and reason, and the rest are imported (with `--strict`, nothing is
//! imported when any row is refused). A file that cannot be read as rows (a
//! CSV header it cannot use, a quote never closed) is refused whole: nothing
//! imported, exit status 1. Codes already in the store are refused
//! unless `--overwrite`. The accepted links are appended to the log in
//! batches (one fsync per batch), then compacted into a snapshot.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use super::{CliError, DataDirArg};
use crate::interchange::{Format, ReadError, RowDefaults, RowError, read_links};
use crate::store::record::{Link, RedirectStatus, now_ms, order_by_code};
use crate::store::{LogOp, Store};

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
    /// Redirect status of rows that give none: 301, 302, 307 or 308 (set it
    /// to the edge's `edge.default_status`, which the API gives links
    /// created without one).
    #[arg(long, default_value = "302", value_parser = parse_status)]
    default_status: RedirectStatus,
}

fn parse_status(text: &str) -> Result<RedirectStatus, String> {
    text.parse::<u16>()
        .ok()
        .and_then(|n| RedirectStatus::from_code(n).ok())
        .ok_or_else(|| format!("{text:?} is not 301, 302, 307 or 308"))
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

    // Accepted rows with their line numbers; duplicates are found by sorting.
    let mut rows: Vec<(u64, Link)> = Vec::new();
    let mut refused: Vec<RowError> = Vec::new();
    read_links(
        BufReader::with_capacity(1 << 20, input),
        format,
        RowDefaults {
            now_ms: now_ms(),
            status: args.default_status,
        },
        |line, row| match row {
            Err(e) => refused.push(e),
            Ok(link) => {
                if !args.overwrite && existing.get(link.code.as_bytes()).is_some() {
                    refused.push(RowError {
                        line,
                        field: "code".into(),
                        message: format!(
                            "{:?} already exists (use --overwrite to replace it)",
                            link.code
                        ),
                    });
                } else {
                    rows.push((line, link));
                }
            }
        },
    )
    .map_err(|e| match e {
        ReadError::Io(e) => CliError::new(format!("{file_name}: {e}")),
        // Not the partial import of exit status 3: no row is taken from a
        // file whose rows cannot be told apart.
        ReadError::FileRefused(e) => {
            CliError::new(format!("{file_name}: {e}; nothing was imported"))
        }
    })?;
    let ops = drop_duplicates(rows, &mut refused);
    refused.sort_by_key(|e| e.line);
    let refused_count = refused.len() as u64;
    refused.truncate(SHOWN_ERRORS);

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
    let parsed = started.elapsed();
    let first_seq = store.log().durable_seq() + 1;
    for (i, batch) in ops.chunks(BATCH).enumerate() {
        if let Err(e) = store.append(batch) {
            // The batches before this one are on disk and live: say so, so
            // that nobody reruns the import expecting a clean slate.
            let done = i * BATCH;
            let kept = if done == 0 {
                "nothing of this import was written".to_owned()
            } else {
                format!(
                    "the first {done} of {} links (sequences {first_seq}..={}) were written \
                     before it and are in the data dir; the rest were not",
                    ops.len(),
                    store.log().durable_seq()
                )
            };
            return Err(CliError::new(format!("{file_name}: {e}; {kept}")));
        }
    }
    let last_seq = store.log().durable_seq();
    let appended = started.elapsed();
    let report = store.compact().map_err(|e| {
        CliError::new(format!(
            "{file_name}: all {} links were written (sequences {first_seq}..={last_seq}) \
             and are in the data dir, but compacting failed: {e}; `uload compact` retries it",
            ops.len()
        ))
    })?;
    let links = report
        .snapshot
        .as_ref()
        .map_or(existing.len(), |s| s.header.link_count);
    let sequences = if ops.is_empty() {
        String::new()
    } else {
        format!(" (sequences {first_seq}..={last_seq})")
    };
    let total = started.elapsed();
    println!(
        "{file_name}: imported {} links{sequences}, refused {refused_count} rows; \
         the store holds {links} links; {:.2} s (read and validate {:.2} s, log append {:.2} s, compact {:.2} s)",
        ops.len(),
        total.as_secs_f64(),
        parsed.as_secs_f64(),
        (appended - parsed).as_secs_f64(),
        (total - appended).as_secs_f64(),
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

/// Keeps the first row for each code (in file order) and refuses the others,
/// each naming the line of the row kept (not the row before it, which may
/// be refused itself).
fn drop_duplicates(rows: Vec<(u64, Link)>, refused: &mut Vec<RowError>) -> Vec<LogOp> {
    // Rows of one code are adjacent in this order, in file order among them.
    let order = order_by_code(&rows, |(_, link)| link.code.as_bytes());
    let mut duplicate = vec![false; rows.len()];
    let mut kept: Option<&(u64, Link)> = None;
    for &i in &order {
        let row = &rows[i as usize];
        match kept {
            Some(first) if first.1.code == row.1.code => {
                duplicate[i as usize] = true;
                refused.push(RowError {
                    line: row.0,
                    field: "code".into(),
                    message: format!("{:?} repeats line {}", row.1.code, first.0),
                });
            }
            _ => kept = Some(row),
        }
    }
    rows.into_iter()
        .zip(duplicate)
        .filter(|(_, dup)| !dup)
        .map(|((_, link), _)| LogOp::Put(link))
        .collect()
}
