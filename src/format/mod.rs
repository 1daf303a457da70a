//! On-disk structures of qcow2, one module each. Pure encode/decode, no I/O.

pub mod bitmaps;
pub mod compressed;
pub mod extensions;
pub mod header;
pub mod l1l2;
pub mod refcount;
pub mod snapshot;

/// The big-endian `u64` at `buf[at..at + 8]`, or `None` past the end of `buf`.
pub fn be64_at(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// The big-endian `u32` at `buf[at..at + 4]`, or `None` past the end of `buf`.
pub fn be32_at(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The big-endian `u16` at `buf[at..at + 2]`, or `None` past the end of `buf`.
pub fn be16_at(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// The big-endian `u64` words of a table (L1, refcount, bitmap tables); a
/// trailing partial word is ignored.
pub fn be64_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8 bytes")))
}
