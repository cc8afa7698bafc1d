//! `uload api-key`: a new API key and the line `admin.api_key_hashes`
//! takes for it, or that line for a key read from standard input. The admin
//! stores and compares only hashes, so the key is printed once, here, and
//! kept nowhere.
//!
//! ```text
//! $ uload api-key
//! key:  8Yt3…(43 base62 characters)
//! hash: sha256:5e1c…
//! $ printf '%s\n' "$KEY" | uload api-key --from-stdin
//! sha256:5e1c…
//! ```

use std::io::{self, BufRead};

use ring::rand::SystemRandom;

use super::CliError;
use crate::admin::codes::generate_code;
use crate::config::{check_api_key, format_key_hash, hash_api_key};

/// Base62 characters of a new key: 43 carry 256 bits.
const NEW_KEY_LENGTH: usize = 43;

#[derive(Debug, clap::Args)]
pub struct ApiKeyArgs {
    /// Read an existing key from standard input (its first line) and print
    /// only its `sha256:` line, instead of making a new key.
    #[arg(long)]
    from_stdin: bool,
}

pub fn run(args: ApiKeyArgs) -> Result<(), CliError> {
    if args.from_stdin {
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::new(format!("standard input: {e}")))?;
        let key = line.strip_suffix('\n').unwrap_or(&line);
        let key = key.strip_suffix('\r').unwrap_or(key);
        check_api_key(key).map_err(|p| CliError::new(format!("standard input: the key {p}")))?;
        println!("{}", format_key_hash(&hash_api_key(key)));
        return Ok(());
    }
    let key = generate_code(&SystemRandom::new(), NEW_KEY_LENGTH)
        .map_err(|_| CliError::new("the system's random number generator failed"))?;
    println!("key:  {key}");
    println!("hash: {}", format_key_hash(&hash_api_key(&key)));
    eprintln!(
        "Give the key to its user; add the hash to admin.api_key_hashes and restart the admin. \
         The key is not kept anywhere."
    );
    Ok(())
}
