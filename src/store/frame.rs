//! Log frames: `length | CRC32C | payload`, and the operations a payload holds.
//!
//! Decoding never panics and never trusts a length: a frame that is cut short
//! is `Incomplete`, one whose checksum or contents are wrong is `Corrupt`, and
//! the caller (recovery, the follower) decides what that means for the file.

use super::record::{Link, LinkEncoding, LinkRef, RecordError, validate_code};

/// Bytes before a frame's payload: `u32` length, `u32` CRC32C.
pub const FRAME_HEADER_LEN: usize = 8;
/// Smallest valid payload: `seq` + `op` + a delete of a one-byte code.
pub const MIN_PAYLOAD_LEN: usize = 8 + 1 + 1 + 1;
/// Largest payload a reader accepts; larger lengths are treated as corruption.
pub const MAX_PAYLOAD_LEN: usize = 128 * 1024;

/// Largest sequence number a file may hold. Far beyond any real log (2^62
/// appends), and low enough that `seq + 1` never overflows anywhere.
pub const MAX_SEQ: u64 = 1 << 62;

/// `seq` if it is at most [`MAX_SEQ`]; otherwise an error naming `key`.
/// For the sequences read from text files (manifests), so that the readers'
/// `seq + 1` cannot overflow there either.
pub fn seq_at_most_max(seq: u64, key: &str) -> Result<u64, String> {
    if seq > MAX_SEQ {
        return Err(format!("{key} {seq} is above {MAX_SEQ}"));
    }
    Ok(seq)
}

/// Operation byte of a put.
pub const OP_PUT: u8 = 1;
/// Operation byte of a delete.
pub const OP_DELETE: u8 = 2;

/// One change to the link table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Insert or replace the link with this code.
    Put(Link),
    /// Remove the link with this code (a tombstone until compaction).
    Delete(String),
}

impl LogOp {
    /// The code this operation touches.
    pub fn code(&self) -> &str {
        match self {
            LogOp::Put(link) => &link.code,
            LogOp::Delete(code) => code,
        }
    }

    /// Validates the operation's fields before it may be appended.
    pub fn validate(&self) -> Result<(), RecordError> {
        match self {
            LogOp::Put(link) => link.validate(),
            LogOp::Delete(code) => validate_code(code.as_bytes()),
        }
    }
}

/// A decoded log record: a sequence number and its operation, borrowed from
/// the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOpRef<'a> {
    Put(LinkRef<'a>),
    Delete(&'a [u8]),
}

impl LogOpRef<'_> {
    /// The code this operation touches.
    pub fn code(&self) -> &[u8] {
        match self {
            LogOpRef::Put(link) => link.code,
            LogOpRef::Delete(code) => code,
        }
    }

    /// An owned copy (checks the target's UTF-8).
    pub fn to_owned_op(&self) -> Result<LogOp, RecordError> {
        Ok(match self {
            LogOpRef::Put(link) => LogOp::Put(link.to_link()?),
            LogOpRef::Delete(code) => {
                LogOp::Delete(std::str::from_utf8(code).unwrap_or_default().to_owned())
            }
        })
    }
}

/// Why a frame could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is incomplete: {have} of {need} bytes present")]
    Incomplete { need: usize, have: usize },
    #[error("frame length {0} is outside {MIN_PAYLOAD_LEN}..={MAX_PAYLOAD_LEN}")]
    BadLength(u32),
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("sequence {0} is outside 1..={MAX_SEQ}")]
    BadSequence(u64),
    #[error("unknown operation byte {0}")]
    UnknownOp(u8),
    #[error("payload has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("{0}")]
    Record(#[from] RecordError),
}

impl FrameError {
    /// Whether more bytes could make this frame valid (a write in progress or
    /// a torn tail), as opposed to bytes that are wrong.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, FrameError::Incomplete { .. })
    }
}

/// Appends one frame holding `op` with sequence number `seq` to `out`, a put
/// in the current link encoding (v2). The op must have been validated.
pub fn encode_frame(seq: u64, op: &LogOp, out: &mut Vec<u8>) {
    encode_frame_as(seq, op, LinkEncoding::CURRENT, out);
}

/// [`encode_frame`] with a put in `encoding`. The writer only uses the
/// current one; `LinkEncoding::V1` produces the frames earlier builds wrote,
/// for tests and tools.
pub fn encode_frame_as(seq: u64, op: &LogOp, encoding: LinkEncoding, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    out.extend_from_slice(&seq.to_le_bytes());
    match op {
        LogOp::Put(link) => {
            out.push(OP_PUT);
            debug_assert!(link.validate().is_ok());
            link.as_ref().encode_as(encoding, out);
        }
        LogOp::Delete(code) => {
            out.push(OP_DELETE);
            out.push(code.len() as u8);
            out.extend_from_slice(code.as_bytes());
        }
    }
    let len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    let len_bytes = len.to_le_bytes();
    let crc = frame_crc(len_bytes, &out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC32C that protects a frame: over the length's four bytes, then the payload.
pub fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload)
}

/// Decodes the frame at the start of `buf`: its sequence number, operation
/// and total length in bytes.
pub fn decode_frame(buf: &[u8]) -> Result<(u64, LogOpRef<'_>, usize), FrameError> {
    let total = check_frame_bytes(buf)?;
    let (seq, op) = decode_payload(&buf[FRAME_HEADER_LEN..total])?;
    Ok((seq, op, total))
}

/// Checks the frame at the start of `buf` without decoding its operation:
/// its length is in range, it is whole, its checksum matches and its
/// sequence is in `1..=MAX_SEQ`. Returns the sequence and the frame's total
/// length in bytes.
///
/// For frames whose contents a reader will not use (records a snapshot
/// already holds): it costs a CRC32C of the frame, not the validation of a
/// link. A frame this accepts may still be refused by [`decode_frame`] (bad
/// contents under a good checksum, which only a buggy or hostile writer
/// produces); one this refuses, `decode_frame` refuses with the same error.
pub fn check_frame(buf: &[u8]) -> Result<(u64, usize), FrameError> {
    let total = check_frame_bytes(buf)?;
    let seq = frame_seq(&buf[FRAME_HEADER_LEN..total]);
    if seq == 0 || seq > MAX_SEQ {
        return Err(FrameError::BadSequence(seq));
    }
    Ok((seq, total))
}

/// The sequence at the start of a payload (at least `MIN_PAYLOAD_LEN` bytes).
fn frame_seq(payload: &[u8]) -> u64 {
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&payload[..8]);
    u64::from_le_bytes(seq)
}

/// Checks a frame's length, completeness and checksum; returns its total length.
fn check_frame_bytes(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(FrameError::Incomplete {
            need: FRAME_HEADER_LEN,
            have: buf.len(),
        });
    }
    let len_bytes = [buf[0], buf[1], buf[2], buf[3]];
    let len = u32::from_le_bytes(len_bytes);
    if (len as usize) < MIN_PAYLOAD_LEN || len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::BadLength(len));
    }
    let total = FRAME_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Err(FrameError::Incomplete {
            need: total,
            have: buf.len(),
        });
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let payload = &buf[FRAME_HEADER_LEN..total];
    let computed = frame_crc(len_bytes, payload);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(total)
}

fn decode_payload(payload: &[u8]) -> Result<(u64, LogOpRef<'_>), FrameError> {
    // MIN_PAYLOAD_LEN was checked by the caller, so the first 9 bytes exist.
    let seq = frame_seq(payload);
    if seq == 0 || seq > MAX_SEQ {
        return Err(FrameError::BadSequence(seq));
    }
    let body = &payload[9..];
    let (op, used) = match payload[8] {
        OP_PUT => {
            let (link, used) = LinkRef::decode(body)?;
            std::str::from_utf8(link.target).map_err(|_| RecordError::TargetUtf8)?;
            (LogOpRef::Put(link), used)
        }
        OP_DELETE => {
            let code_len = body[0] as usize;
            let code = body.get(1..1 + code_len).ok_or(RecordError::Truncated {
                need: 1 + code_len,
                have: body.len(),
            })?;
            validate_code(code)?;
            (LogOpRef::Delete(code), 1 + code_len)
        }
        other => return Err(FrameError::UnknownOp(other)),
    };
    if used != body.len() {
        return Err(FrameError::TrailingBytes(body.len() - used));
    }
    Ok((seq, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> LogOp {
        LogOp::Put(Link::new("abc", "https://example.com/").unwrap())
    }

    #[test]
    fn round_trip_put_and_delete() {
        for (seq, op) in [(1u64, put()), (MAX_SEQ, LogOp::Delete("x-Y_9".into()))] {
            let mut buf = Vec::new();
            encode_frame(seq, &op, &mut buf);
            let (got_seq, got, used) = decode_frame(&buf).unwrap();
            assert_eq!((got_seq, used), (seq, buf.len()));
            assert_eq!(got.to_owned_op().unwrap(), op);
        }
    }

    #[test]
    fn header_fields() {
        let mut buf = Vec::new();
        encode_frame(0x0102_0304_0506_0708, &LogOp::Delete("ab".into()), &mut buf);
        let len = u32::from_le_bytes(buf[0..4].try_into().unwrap());
        assert_eq!(len as usize, buf.len() - 8, "length excludes the header");
        assert_eq!(len, 8 + 1 + 1 + 2);
        let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
        assert_eq!(crc, frame_crc(buf[0..4].try_into().unwrap(), &buf[8..]));
        assert_eq!(&buf[8..16], &0x0102_0304_0506_0708u64.to_le_bytes(), "seq");
        assert_eq!(buf[16], OP_DELETE);
        assert_eq!(buf[17], 2);
        assert_eq!(&buf[18..], b"ab");
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let mut buf = Vec::new();
        encode_frame(5, &put(), &mut buf);
        for cut in 0..buf.len() {
            let err = decode_frame(&buf[..cut]).unwrap_err();
            assert!(err.is_incomplete(), "cut {cut}: {err}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_frame(5, &put(), &mut buf);
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                match decode_frame(&bad) {
                    Err(_) => {}
                    Ok((seq, op, _)) => panic!("flip {byte}.{bit} accepted: {seq} {op:?}"),
                }
            }
        }
    }

    #[test]
    fn lengths_out_of_range() {
        for len in [
            0u32,
            MIN_PAYLOAD_LEN as u32 - 1,
            MAX_PAYLOAD_LEN as u32 + 1,
            u32::MAX,
        ] {
            let mut buf = len.to_le_bytes().to_vec();
            buf.extend_from_slice(&[0u8; 64]);
            assert_eq!(decode_frame(&buf).unwrap_err(), FrameError::BadLength(len));
        }
    }

    #[test]
    fn sequences_out_of_range_are_corrupt() {
        for seq in [0, MAX_SEQ + 1, u64::MAX] {
            let mut buf = Vec::new();
            encode_frame(seq, &LogOp::Delete("a".into()), &mut buf);
            assert_eq!(
                decode_frame(&buf).unwrap_err(),
                FrameError::BadSequence(seq)
            );
        }
    }

    /// A payload with a valid checksum but bad contents is corruption, not a torn tail.
    #[test]
    fn checksummed_garbage_is_corrupt() {
        let make = |payload: &[u8]| {
            let len = (payload.len() as u32).to_le_bytes();
            let mut buf = len.to_vec();
            buf.extend_from_slice(&frame_crc(len, payload).to_le_bytes());
            buf.extend_from_slice(payload);
            buf
        };
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[9, 1, b'a']);
        assert_eq!(
            decode_frame(&make(&p)).unwrap_err(),
            FrameError::UnknownOp(9)
        );
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[OP_DELETE, 1, b'a', 0]);
        assert_eq!(
            decode_frame(&make(&p)).unwrap_err(),
            FrameError::TrailingBytes(1)
        );
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[OP_DELETE, 5, b'a']);
        assert!(matches!(
            decode_frame(&make(&p)).unwrap_err(),
            FrameError::Record(RecordError::Truncated { .. })
        ));
        let mut p = 1u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[OP_DELETE, 1, b'/']);
        assert!(matches!(
            decode_frame(&make(&p)).unwrap_err(),
            FrameError::Record(RecordError::CodeCharset(b'/', 0))
        ));
        // `check_frame` looks at the checksum and the sequence only: these
        // frames pass it (a reader skipping covered records accepts them).
        assert_eq!(check_frame(&make(&p)), Ok((1, make(&p).len())));
    }

    /// `check_frame` refuses every frame `decode_frame` refuses for its
    /// length, completeness, checksum or sequence, with the same error, and
    /// agrees with it on a good frame.
    #[test]
    fn check_frame_agrees_with_decode_frame() {
        let mut buf = Vec::new();
        encode_frame(7, &put(), &mut buf);
        assert_eq!(check_frame(&buf), Ok((7, buf.len())));
        let mut longer = buf.clone();
        longer.extend_from_slice(&[0xee; 20]);
        assert_eq!(check_frame(&longer), Ok((7, buf.len())));
        for cut in 0..buf.len() {
            assert_eq!(
                check_frame(&buf[..cut]).unwrap_err(),
                decode_frame(&buf[..cut]).unwrap_err()
            );
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                let err = check_frame(&bad).unwrap_err();
                assert_eq!(Err(err), decode_frame(&bad).map(|_| ()), "{byte}.{bit}");
            }
        }
        for seq in [0, MAX_SEQ + 1, u64::MAX] {
            let mut buf = Vec::new();
            encode_frame(seq, &LogOp::Delete("a".into()), &mut buf);
            assert_eq!(check_frame(&buf), Err(FrameError::BadSequence(seq)));
        }
    }
}
