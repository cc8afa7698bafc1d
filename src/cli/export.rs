//! `uload export`: every live link as JSON lines, in code order.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use super::{CliError, DataDirArg};
use crate::interchange::LinkJson;
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
        let count = write_links(&view, io::stdout().lock(), "standard output")?;
        eprintln!("exported {count} links at sequence {}", view.seq());
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
        let count = write_links(&view, &file, &tmp.display().to_string())?;
        file.sync_all().map_err(at(&tmp))?;
        std::fs::rename(&tmp, path).map_err(at(path))?;
        Ok(count)
    })();
    let count = match written {
        Ok(count) => count,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    eprintln!("exported {count} links at sequence {}", view.seq());
    Ok(())
}

/// Writes every live link of `view` to `sink` as JSON lines; the count.
fn write_links(view: &TableView, sink: impl Write, name: &str) -> Result<u64, CliError> {
    let write_err = |e: io::Error| CliError::new(format!("{name}: {e}"));
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    let mut count = 0u64;
    for link in view.iter() {
        let link = link.map_err(CliError::new)?;
        serde_json::to_writer(&mut out, &LinkJson::from_link(&link))
            .map_err(|e| write_err(e.into()))?;
        out.write_all(b"\n").map_err(write_err)?;
        count += 1;
    }
    out.flush().map_err(write_err)?;
    Ok(count)
}
