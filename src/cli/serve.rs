//! The long-running commands: `uload edge`, `uload admin`, `uload up`, and
//! `uload check-config`, which validates what they would read.

use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::{Config, format_key_hash, hash_api_key};
use crate::edge::EdgeOptions;

/// The config file argument of the serving commands.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file (default: conf/uload.yaml when it exists, else built-in defaults).
    #[arg(long, short = 'c', env = "ULOAD_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn load(&self) -> Result<Config, CliError> {
        let default = Path::new("conf/uload.yaml");
        let path = self
            .config
            .as_deref()
            .or_else(|| default.exists().then_some(default));
        Config::load(path).map_err(CliError::new)
    }
}

#[derive(Debug, clap::Args)]
pub struct EdgeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Graceful upgrade: take over the sockets of the running edge (Pingora `-u`).
    #[arg(long, short = 'u')]
    upgrade: bool,
    /// Run in the background.
    #[arg(long, short = 'd')]
    daemon: bool,
}

pub fn edge(args: EdgeArgs) -> Result<(), CliError> {
    init_tracing();
    // A file-size limit must give its writers (access log, limiter state)
    // EFBIG, not kill the edge with SIGXFSZ.
    crate::store::datadir::ignore_file_size_signal();
    let config = args.config.load()?;
    let options = EdgeOptions {
        upgrade: args.upgrade,
        daemon: args.daemon,
    };
    crate::edge::run(&config, &options).map_err(CliError::new)
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    config: ConfigArg,
}

pub fn admin(args: AdminArgs) -> Result<(), CliError> {
    init_tracing();
    let config = args.config.load()?;
    if config.admin.api_key_hashes.is_empty() {
        tracing::warn!(
            "no API key configured (admin.api_key_hashes or ULOAD_API_KEY): every /api request will get 401"
        );
    }
    crate::admin::run(&config).map_err(CliError::new)
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    config: ConfigArg,
}

/// Admin and edge in one process on one machine, sharing the data dir.
pub fn up(args: UpArgs) -> Result<(), CliError> {
    init_tracing();
    let mut config = args.config.load()?;
    // Both in one process: a listener shared between them would fail (or
    // worse, be served by one of them only) after the other has started.
    config.check_one_host().map_err(CliError::new)?;
    if config.admin.api_key_hashes.is_empty() {
        let key = random_key().map_err(CliError::new)?;
        config.admin.api_key_hashes.push(hash_api_key(&key));
        println!(
            "uload up: no API key configured; generated one for this run:\n\n  export ULOAD_API_KEY={key}\n"
        );
        println!(
            "(its hash, for admin.api_key_hashes: {})",
            format_key_hash(&hash_api_key(&key))
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| CliError::new(format!("{}: {e}", config.data_dir.display())))?;
    let admin_config = config.clone();
    let admin = std::thread::Builder::new()
        .name("uload-admin".into())
        .spawn(move || {
            if let Err(e) = crate::admin::run(&admin_config) {
                eprintln!("uload: admin: {e}");
                std::process::exit(1);
            }
        })
        .map_err(CliError::new)?;
    println!(
        "uload up: edge on http://{} (redirects, /api, /health), admin on http://{}, data in {}",
        config.edge.listen,
        config.admin.listen,
        config.data_dir.display()
    );
    let result = crate::edge::run(&config, &EdgeOptions::default()).map_err(CliError::new);
    drop(admin);
    result
}

fn random_key() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_owned())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Files to check.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Validates config files (and the Pingora conf each names).
pub fn check_config(args: CheckConfigArgs) -> Result<(), CliError> {
    let mut failed = 0;
    for file in &args.files {
        match Config::load(Some(file)) {
            Ok(config) => {
                if let Some(p) = &config.edge.pingora_conf
                    && let Err(e) = crate::edge::load_pingora_conf(p)
                {
                    eprintln!(
                        "{}: edge.pingora_conf: {}: {e}",
                        file.display(),
                        p.display()
                    );
                    failed += 1;
                    continue;
                }
                // The certificate and key the HTTPS listener would serve.
                // An expired one too: the edge would serve it (see
                // `edge/tls.rs`), but a deployment should not go on.
                if let Some(tls) = &config.tls
                    && let Err(e) = crate::edge::tls::CertStore::open(tls, &config.source)
                        .and_then(|c| c.validity_problem().map_or(Ok(()), Err))
                {
                    eprintln!("{e}");
                    failed += 1;
                    continue;
                }
                // Valid for an edge and an admin each on its own host;
                // said when they could not share one.
                if let Err(e) = config.check_one_host() {
                    eprintln!(
                        "warning: {e} (fine for an edge and an admin on different hosts; `uload up` refuses it)"
                    );
                }
                println!("{}: ok", file.display());
            }
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(CliError::new(format!(
            "{failed} of {} config files invalid",
            args.files.len()
        )));
    }
    Ok(())
}

/// Logs to stderr (systemd captures it); `RUST_LOG` filters, default `info`.
/// Pingora's `log` records are forwarded too.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
