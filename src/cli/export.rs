//! `uload export`: every live link as JSON lines, in code order, and a
//! warning naming those `uload import` would refuse (see [`report`]).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use super::{CliError, DataDirArg};
use crate::interchange::{LinkJson, RowDefaults, RowError};
use crate::store::DataDir;
use crate::store::view::TableView;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Write to this file instead of standard output (replaced only once the
    /// export is whole).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> Result<(), CliError> {
    let root = args.dir.existing()?;
    let view = DataDir::new(root).load_view(true)?;
    let Some(path) = &args.output else {
        let exported = write_links(&view, io::stdout().lock(), "standard output")?;
        report(&exported, "standard output", view.seq());
        return Ok(());
    };
    // Written beside `path` and renamed over it once whole and synced: an
    // export that fails (a full disk) or is killed leaves `path` as it was,
    // never a file that looks like a smaller export.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let at = |p: &std::path::Path| {
        let p = p.display().to_string();
        move |e: io::Error| CliError::new(format!("{p}: {e}"))
    };
    let written = (|| {
        let file = File::create(&tmp).map_err(at(&tmp))?;
        let exported = write_links(&view, &file, &tmp.display().to_string())?;
        file.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        Ok(exported)
    })();
    let exported = match written {
        Ok(exported) => exported,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    report(&exported, &path.display().to_string(), view.seq());
    Ok(())
}

/// Exported links `uload import` would refuse that are named one by one;
/// all are counted.
const SHOWN_UNIMPORTABLE: usize = 20;

/// What [`write_links`] wrote.
#[derive(Debug, Default)]
struct Exported {
    /// Links written.
    count: u64,
    /// Links written that `uload import` would refuse.
    unimportable_count: u64,
    /// The first [`SHOWN_UNIMPORTABLE`] of them, each as the refusal an
    /// import of the export would print, with the link's code.
    unimportable: Vec<(String, RowError)>,
}

/// Says on stderr what was exported, and which links of it `uload import`
/// would refuse: links stored before the admin's URL policy tightened (a URL
/// with credentials) or before a code became reserved are in the store and
/// exported, but an import refuses them as the API does. The import's
/// rules are not relaxed for its own format, so a migration through export
/// and import loses them; this says so while the source is still there.
fn report(exported: &Exported, name: &str, seq: u64) {
    eprintln!("exported {} links at sequence {seq}", exported.count);
    if exported.unimportable_count == 0 {
        return;
    }
    eprintln!(
        "warning: {} of the {} exported links would be refused by `uload import` \
         (stored before the rules they break: the URL policy, reserved codes); \
         an import of this export leaves them out:",
        exported.unimportable_count, exported.count
    );
    for (code, e) in &exported.unimportable {
        eprintln!(
            "{name}: line {}: {code:?}: {}: {}",
            e.line, e.field, e.message
        );
    }
    let unnamed = exported.unimportable_count - exported.unimportable.len() as u64;
    if unnamed > 0 {
        eprintln!("... and {unnamed} more");
    }
}

/// Writes every live link of `view` to `sink` as JSON lines.
fn write_links(view: &TableView, sink: impl Write, name: &str) -> Result<Exported, CliError> {
    let write_err = |e: io::Error| CliError::new(format!("{name}: {e}"));
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    let mut exported = Exported::default();
    for link in view.iter() {
        let link = link.map_err(CliError::new)?;
        let json = LinkJson::from_link(&link);
        serde_json::to_writer(&mut out, &json).map_err(|e| write_err(e.into()))?;
        out.write_all(b"\n").map_err(write_err)?;
        exported.count += 1;
        // The check `uload import` makes of a JSON-lines row. The export
        // gives every link its status and creation time, so the defaults
        // are never used.
        if let Err((field, message)) = json.into_link(RowDefaults::at(0)) {
            exported.unimportable_count += 1;
            if exported.unimportable.len() < SHOWN_UNIMPORTABLE {
                exported.unimportable.push((
                    link.code_str().to_owned(),
                    RowError {
                        line: exported.count,
                        field: field.to_owned(),
                        message,
                    },
                ));
            }
        }
    }
    out.flush().map_err(write_err)?;
    Ok(exported)
}
