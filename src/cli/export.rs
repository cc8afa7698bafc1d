//! `uload export`: every live link as JSON lines, in code order.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use super::{CliError, DataDirArg};
use crate::interchange::LinkJson;
use crate::store::DataDir;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn run(args: ExportArgs) -> Result<(), CliError> {
    let root = &args.dir.data_dir;
    if !root.is_dir() {
        return Err(CliError::new(format!(
            "{}: not a directory",
            root.display()
        )));
    }
    let view = DataDir::new(root).load_view(true)?;
    let (sink, name): (Box<dyn Write>, String) = match &args.output {
        Some(path) => (
            Box::new(
                File::create(path)
                    .map_err(|e| CliError::new(format!("{}: {e}", path.display())))?,
            ),
            path.display().to_string(),
        ),
        None => (Box::new(io::stdout().lock()), "standard output".into()),
    };
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
    eprintln!("exported {count} links at sequence {}", view.seq());
    Ok(())
}
