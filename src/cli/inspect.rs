//! `uload inspect`: reads a data dir without changing it and reports format
//! versions, sequences, counts and checksums of the manifest, the snapshot and
//! every log segment. Exits non-zero when anything fails validation.

use std::fs;
use std::path::Path;

use serde::Serialize;

use super::{CliError, DataDirArg};
use crate::interchange::format_time;
use crate::store::DataDir;
use crate::store::log::{SegmentEnd, list_segments, scan_segment, valid_frame_follows};
use crate::store::snapshot::Snapshot;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    data_dir: String,
    manifest: Option<ManifestReport>,
    snapshot: Option<SnapshotReport>,
    segments: Vec<SegmentReport>,
    /// Sequence of the last record (snapshot or log).
    last_seq: u64,
    /// Live links after applying the log to the snapshot.
    links: Option<u64>,
    overlay_records: Option<usize>,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ManifestReport {
    snapshot: String,
    seq: u64,
    links: u64,
}

#[derive(Debug, Serialize)]
struct SnapshotReport {
    file: String,
    format_version: u32,
    seq: u64,
    links: u64,
    buckets: u64,
    load_factor: f64,
    records_bytes: u64,
    index_bytes: u64,
    records_crc32c: String,
    index_crc32c: String,
    checksums_ok: bool,
    created_at: String,
}

#[derive(Debug, Serialize)]
struct SegmentReport {
    file: String,
    format_version: Option<u32>,
    first_seq: u64,
    last_seq: u64,
    frames: u64,
    bytes: u64,
    state: String,
}

pub fn run(args: InspectArgs) -> Result<(), CliError> {
    let root = args.dir.existing()?;
    let dir = DataDir::new(root);
    let mut report = Report {
        data_dir: root.display().to_string(),
        ..Default::default()
    };
    inspect_snapshot(&dir, &mut report);
    inspect_log(&dir, &mut report);
    if report.problems.is_empty() {
        match dir.load_view(false) {
            Ok(view) => {
                report.links = Some(view.len());
                report.overlay_records = Some(view.overlay_len());
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CliError::new)?
        );
    } else {
        print_text(&report);
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(format!(
            "{}: {} problem(s) found",
            root.display(),
            report.problems.len()
        )))
    }
}

fn inspect_snapshot(dir: &DataDir, report: &mut Report) {
    let manifest = match dir.read_manifest() {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => return report.problems.push(e.to_string()),
    };
    report.manifest = Some(ManifestReport {
        snapshot: manifest.snapshot.clone(),
        seq: manifest.seq,
        links: manifest.links,
    });
    report.last_seq = manifest.seq;
    let path = dir.snapshot_dir().join(&manifest.snapshot);
    let snap = match Snapshot::open(&path, false) {
        Ok(s) => s,
        Err(e) => return report.problems.push(e.to_string()),
    };
    let h = *snap.header();
    let checksums = snap.verify_checksums();
    if let Err(e) = &checksums {
        report.problems.push(format!("{}: {e}", path.display()));
    }
    if h.seq != manifest.seq || h.link_count != manifest.links {
        report.problems.push(format!(
            "{}: manifest says sequence {} and {} links, the snapshot holds {} and {}",
            dir.manifest_path().display(),
            manifest.seq,
            manifest.links,
            h.seq,
            h.link_count
        ));
    }
    report.snapshot = Some(SnapshotReport {
        file: path.display().to_string(),
        format_version: h.version,
        seq: h.seq,
        links: h.link_count,
        buckets: h.bucket_count,
        load_factor: h.link_count as f64 / h.bucket_count as f64,
        records_bytes: h.records_len,
        index_bytes: h.index_len,
        records_crc32c: format!("{:08x}", h.records_crc),
        index_crc32c: format!("{:08x}", h.index_crc),
        checksums_ok: checksums.is_ok(),
        created_at: format_time(h.created_at_ms),
    });
}

fn inspect_log(dir: &DataDir, report: &mut Report) {
    let segments = match list_segments(&dir.log_dir()) {
        Ok(s) => s,
        Err(e) => return report.problems.push(e.to_string()),
    };
    let count = segments.len();
    for (i, seg) in segments.into_iter().enumerate() {
        let file = seg.path.display().to_string();
        let buf = match fs::read(&seg.path) {
            Ok(b) => b,
            Err(e) => {
                report.problems.push(format!("{file}: {e}"));
                continue;
            }
        };
        let scan = match scan_segment(&buf, |_, _| {}) {
            Ok(s) => s,
            Err(reason) => {
                report
                    .problems
                    .push(format!("{file}: bad segment header: {reason}"));
                continue;
            }
        };
        let state = match &scan.end {
            SegmentEnd::Clean => "clean".to_owned(),
            SegmentEnd::Stopped { offset, reason } => {
                let torn =
                    i + 1 == count && !valid_frame_follows(&buf[*offset as usize..], scan.last_seq);
                if torn {
                    format!(
                        "torn tail at offset {offset} ({} bytes; the next writer truncates it): {reason}",
                        scan.file_len - offset
                    )
                } else {
                    report
                        .problems
                        .push(format!("{file}: corrupt at offset {offset}: {reason}"));
                    format!("corrupt at offset {offset}: {reason}")
                }
            }
        };
        report.last_seq = report.last_seq.max(scan.last_seq);
        report.segments.push(SegmentReport {
            file,
            format_version: Some(scan.version),
            first_seq: scan.first_seq,
            last_seq: scan.last_seq,
            frames: scan.frames,
            bytes: scan.file_len,
            state,
        });
    }
}

fn print_text(r: &Report) {
    println!("data dir      {}", r.data_dir);
    match (&r.manifest, &r.snapshot) {
        (None, _) => println!("snapshot      none yet (the log holds everything)"),
        (Some(m), None) => println!(
            "manifest      names {} (seq {}, {} links)",
            m.snapshot, m.seq, m.links
        ),
        (Some(_), Some(s)) => {
            println!("snapshot      {}", short(&s.file));
            println!("  format      v{}", s.format_version);
            println!("  sequence    {}", s.seq);
            println!("  links       {}", s.links);
            println!("  buckets     {} (load {:.2})", s.buckets, s.load_factor);
            println!(
                "  records     {} bytes, crc32c {}",
                s.records_bytes, s.records_crc32c
            );
            println!(
                "  index       {} bytes, crc32c {}",
                s.index_bytes, s.index_crc32c
            );
            println!(
                "  checksums   {}",
                if s.checksums_ok { "ok" } else { "MISMATCH" }
            );
            println!("  created     {}", s.created_at);
        }
    }
    println!("log           {} segment(s)", r.segments.len());
    for s in &r.segments {
        println!(
            "  {}  v{}  seq {}..={}  {} frames  {} bytes  {}",
            short(&s.file),
            s.format_version.unwrap_or(0),
            s.first_seq,
            s.last_seq,
            s.frames,
            s.bytes,
            s.state
        );
    }
    println!("last sequence {}", r.last_seq);
    if let Some(links) = r.links {
        println!(
            "live links    {links} ({} overlay records)",
            r.overlay_records.unwrap_or(0)
        );
    }
    if r.problems.is_empty() {
        println!("status        ok");
    } else {
        for p in &r.problems {
            println!("PROBLEM       {p}");
        }
    }
}

fn short(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |n| n.to_string_lossy().into_owned())
}
