//! The snapshot's hash function, fixed by the format: FNV-1a (64-bit) over the
//! code's bytes, then the MurmurHash3 64-bit finalizer so that the low bits
//! (which pick the bucket) depend on every input byte.
//!
//! It must give the same value on every build and machine, so it is written
//! out here rather than taken from `std` (whose hasher is seeded per process)
//! and it is pinned by known-answer tests below and in `docs/storage.md`.

/// Identifier of this hash function in the snapshot header.
pub const HASH_FNV1A_FMIX64: u32 = 1;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hashes a short code.
#[inline]
pub fn code_hash(code: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in code {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers, computed by an independent Python implementation of the
    /// spec (docs/storage.md). If these change, every snapshot is unreadable.
    #[test]
    fn known_answers() {
        assert_eq!(code_hash(b""), fmix64(FNV_OFFSET));
        assert_eq!(code_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(code_hash(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(code_hash(b"abc1234"), 0x3cbd_baa5_572f_78e2);
    }

    #[test]
    fn low_bits_spread() {
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            buckets[(code_hash(format!("c{i}").as_bytes()) & 15) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (800..1200).contains(&n)),
            "{buckets:?}"
        );
    }
}
