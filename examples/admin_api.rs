//! The admin API in-process on a loopback port, over a data dir in a temp
//! dir: the same router and state `uload admin` serves, started the way the
//! tests start it (a bound listener and a shutdown future).

use uload::admin::{AdminState, serve};
use uload::config::Config;

const KEY: &str = "example-key-0123456789";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let yaml = format!(
        "data_dir: {}\npublic_base_url: http://127.0.0.1:8080/\nadmin:\n  api_key: {KEY}\n",
        dir.path().display()
    );
    let config = Config::from_yaml_str(&yaml, "example", &[])?;
    let state = AdminState::open(&config)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
        println!(
            "admin on http://{}; Ctrl-C stops it",
            listener.local_addr()?
        );
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve(listener, state, ctrl_c).await
    })?;
    Ok(())
}

// cargo run --example admin_api
// curl -s -H 'Authorization: Bearer example-key-0123456789' -H 'Content-Type: application/json' \
//      -d '{"url":"https://example.com/","code":"hello"}' 127.0.0.1:8081/api/links
// curl -s -H 'Authorization: Bearer example-key-0123456789' 127.0.0.1:8081/api/links/hello
