//! Short codes the API hands out or accepts: generated base62 codes from a
//! CSPRNG, and the codes no link may take because the edge routes them itself.

use ring::rand::{SecureRandom, SystemRandom};

use super::error::{ApiError, ErrorCode};
use crate::store::record::validate_code;

/// Codes that collide with the edge's own routes, compared case-insensitively.
/// Most contain bytes the code charset refuses anyway; they are listed here so
/// that the one place to look is this one.
pub const RESERVED_CODES: &[&str] = &[
    "api",
    "health",
    "metrics",
    "favicon.ico",
    "robots.txt",
    ".well-known",
    "admin",
    "static",
    "assets",
];

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Largest multiple of 62 that fits in a byte: bytes at or above it are
/// dropped, so every symbol is equally likely (no modulo bias).
const UNBIASED_LIMIT: u8 = 62 * 4;

/// Whether `code` is one of [`RESERVED_CODES`] (ignoring ASCII case).
pub fn is_reserved(code: &str) -> bool {
    RESERVED_CODES.iter().any(|r| r.eq_ignore_ascii_case(code))
}

/// Checks a code a client chose: the reserved list (first, so that a
/// reserved name is reported as such), then the store's charset.
pub fn check_custom_code(code: &str) -> Result<(), ApiError> {
    if is_reserved(code) {
        return Err(ApiError::new(
            ErrorCode::ReservedCode,
            format!("{code:?} is reserved for the edge's own routes"),
        )
        .on("code"));
    }
    validate_code(code.as_bytes()).map_err(|e| ApiError::from_record(&e))
}

/// A uniformly random base62 code of `len` characters, never a reserved one.
pub fn generate_code(rng: &SystemRandom, len: usize) -> Result<String, ring::error::Unspecified> {
    loop {
        let mut code = String::with_capacity(len);
        let mut buf = [0u8; 64];
        while code.len() < len {
            rng.fill(&mut buf)?;
            for &b in &buf {
                if b < UNBIASED_LIMIT && code.len() < len {
                    code.push(BASE62[(b % 62) as usize] as char);
                }
            }
        }
        if !is_reserved(&code) {
            return Ok(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_are_valid_base62() {
        let rng = SystemRandom::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let code = generate_code(&rng, 7).unwrap();
            assert_eq!(code.len(), 7);
            assert!(code.bytes().all(|b| b.is_ascii_alphanumeric()), "{code}");
            seen.insert(code);
        }
        assert_eq!(
            seen.len(),
            1000,
            "62^7 codes: 1000 draws should not collide"
        );
    }

    #[test]
    fn symbols_are_roughly_uniform() {
        let rng = SystemRandom::new();
        let mut counts = [0u32; 62];
        for _ in 0..2000 {
            for b in generate_code(&rng, 31).unwrap().bytes() {
                let i = BASE62.iter().position(|&c| c == b).unwrap();
                counts[i] += 1;
            }
        }
        // 62000 symbols, 1000 expected per bucket; a biased modulo would put
        // ~1.3x as many into the first symbols.
        for (i, &n) in counts.iter().enumerate() {
            assert!((800..1200).contains(&n), "symbol {i}: {n}");
        }
    }

    #[test]
    fn reserved_codes_are_refused_in_any_case() {
        for code in [
            "api",
            "API",
            "Health",
            "mEtRiCs",
            "admin",
            "Static",
            "ASSETS",
            "favicon.ico",
            "Robots.TXT",
            ".well-known",
        ] {
            let e = check_custom_code(code).unwrap_err();
            assert_eq!(e.code, ErrorCode::ReservedCode, "{code}");
            assert_eq!(e.field.as_deref(), Some("code"));
        }
        assert!(check_custom_code("apis").is_ok());
        assert_eq!(
            check_custom_code("a b").unwrap_err().code,
            ErrorCode::InvalidCode
        );
    }
}
