//! Cluster compression codecs: raw deflate ("zlib" in QEMU) and zstd.
//!
//! Writing mirrors QEMU: deflate with a 4 KiB window (window bits 12), no zlib
//! header, one `Z_FINISH`; zstd as one frame with the default parameters. A stream
//! is kept only if it saves space (see [`worth_storing`]).
//!
//! Reading mirrors QEMU too: raw inflate in one call into a cluster-sized buffer
//! (which also accepts 32 KiB-window streams), success when the output is full;
//! zstd frames are decoded until exactly one cluster has been produced. Output is
//! bounded by the cluster size whatever the input claims.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::error::{Error, Result};
use crate::format::header::CompressionType;

/// Whether a stream of `len` bytes is worth storing instead of a plain cluster of
/// `cs` bytes: it must be shorter than the cluster and, for clusters larger than a
/// sector, save at least one 512-byte sector.
pub fn worth_storing(len: usize, cs: usize) -> bool {
    if cs <= 512 {
        len < cs
    } else {
        len + 512 <= cs
    }
}

thread_local! {
    static DEFLATE: RefCell<Option<(i32, Compress)>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Compresses one cluster. Returns `None` when the stream would not save space
/// (or the codec fails, which for in-memory compression means the same).
pub fn compress(
    codec: CompressionType,
    level: Option<i32>,
    data: &[u8],
    cs: usize,
) -> Option<Vec<u8>> {
    // Room for the worst case (zlib's deflateBound, zstd's compress bound): zlib-rs
    // panics when a stored block does not fit the output buffer, so never give it
    // less; whether the stream is worth storing is decided afterwards.
    let bound = data.len() + data.len() / 8 + 1024;
    let mut out = vec![0u8; bound.max(zstd::zstd_safe::compress_bound(data.len()))];
    let n = match codec {
        CompressionType::Zlib => {
            let level = level.unwrap_or(6).clamp(0, 9);
            DEFLATE.with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().map(|(l, _)| *l) != Some(level) {
                    *c = Some((
                        level,
                        Compress::new_with_window_bits(Compression::new(level as u32), false, 12),
                    ));
                }
                let (_, z) = c.as_mut().expect("just set");
                z.reset();
                match z.compress(data, &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => Some(z.total_out() as usize),
                    _ => None,
                }
            })?
        }
        CompressionType::Zstd => {
            let level = level.unwrap_or(3);
            ZSTD.with(|c| {
                let mut c = c.borrow_mut();
                if c.as_ref().map(|(l, _)| *l) != Some(level) {
                    *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
                }
                let (_, z) = c.as_mut().expect("just set");
                z.compress_to_buffer(data, &mut out).ok()
            })?
        }
    };
    if !worth_storing(n, cs) {
        return None;
    }
    out.truncate(n);
    Some(out)
}

/// Inflates a raw deflate stream into `out` (one cluster). The input may hold
/// trailing bytes (the next stream, sector padding); they are ignored.
pub fn decompress_zlib(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = Decompress::new(false);
    let r = d.decompress(input, out, FlushDecompress::Finish);
    let full = d.total_out() as usize == out.len();
    match r {
        // Stream end, or a full buffer (QEMU accepts Z_BUF_ERROR with full output).
        Ok(_) if full => Ok(()),
        Ok(_) => Err(Error::corrupt(
            "compressed cluster",
            0,
            format!(
                "deflate stream inflates to {} bytes, not {}",
                d.total_out(),
                out.len()
            ),
        )),
        Err(e) => Err(Error::corrupt(
            "compressed cluster",
            0,
            format!("bad deflate stream: {e}"),
        )),
    }
}

/// Largest zstd window (log2) the decoder accepts: 8 MiB. A frame written for one
/// cluster (≤ 2 MiB) with a known source size never needs more; a crafted frame
/// header cannot make the decoder allocate a large window.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decodes zstd frames from `input` until `out` (one cluster) is full, across as
/// many frames as needed. As in QEMU (`qcow2_zstd_decompress`): no progress is an
/// error, and so is a frame that is not completely flushed once the cluster is
/// full (the stream holds more than one cluster). Trailing input is ignored.
pub fn decompress_zstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let bad = |d: String| Error::corrupt("compressed cluster", 0, d);
    let mut dec = Decoder::new().map_err(|e| Error::io("zstd decoder", e))?;
    dec.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| Error::io("zstd decoder", e))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut hint = 0usize;
    while outb.pos() < outb.capacity() {
        let (before_in, before_out) = (inb.pos(), outb.pos());
        hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| bad(format!("bad zstd stream: {e}")))?;
        if inb.pos() == before_in && outb.pos() == before_out {
            return Err(bad(format!(
                "zstd stream ends after {} of {} bytes",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
    if hint > 0 {
        return Err(bad("zstd frame holds more than one cluster".into()));
    }
    Ok(())
}

/// Decompresses with the given codec into `out`.
pub fn decompress(codec: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match codec {
        CompressionType::Zlib => decompress_zlib(input, out),
        CompressionType::Zstd => decompress_zstd(input, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};
    use proptest::prelude::*;

    fn compressible(seed: u8, cs: usize) -> Vec<u8> {
        (0..cs)
            .map(|i| b"the quick brown fox "[(i + seed as usize) % 20])
            .collect()
    }

    #[test]
    fn random_data_is_not_worth_compressing() {
        let mut x = 0x1234_5678_u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, None, &data, 65536).is_none());
        assert!(compress(CompressionType::Zstd, None, &data, 65536).is_none());
    }

    #[test]
    fn truncated_stream_is_corrupt() {
        let data = compressible(3, 4096);
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let s = compress(codec, None, &data, 4096).unwrap();
            let mut out = vec![0u8; 4096];
            assert!(decompress(codec, &s[..s.len() / 2], &mut out).is_err());
        }
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i / 7 % 251) as u8 ^ (i % 3) as u8)
            .collect()
    }

    fn deflate_raw(data: &[u8], window_bits: u8) -> Vec<u8> {
        let mut c = Compress::new_with_window_bits(Compression::default(), false, window_bits);
        let mut out = vec![0u8; data.len() * 2 + 64];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    #[test]
    fn deflate_with_4k_and_32k_windows_both_decode() {
        let data = sample(65536);
        for bits in [12, 15] {
            let mut stream = deflate_raw(&data, bits);
            stream.extend_from_slice(&[0xa5; 700]); // trailing bytes of the sector
            let mut out = vec![0u8; data.len()];
            decompress_zlib(&stream, &mut out).unwrap();
            assert_eq!(out, data, "window bits {bits}");
        }
    }

    #[test]
    fn deflate_that_ends_early_is_corrupt() {
        let data = sample(4096);
        let stream = deflate_raw(&data, 12);
        let mut out = vec![0u8; 8192];
        assert!(matches!(
            decompress_zlib(&stream, &mut out),
            Err(Error::Corrupt { .. })
        ));
        let mut out = vec![0u8; 4096];
        assert!(decompress_zlib(&stream[..stream.len() / 2], &mut out).is_err());
        assert!(decompress_zlib(&[0xff; 64], &mut out).is_err());
        assert!(decompress_zlib(&[], &mut out).is_err());
    }

    #[test]
    fn deflate_that_holds_more_than_a_cluster_fills_the_cluster() {
        // QEMU accepts Z_BUF_ERROR with a full output buffer.
        let data = sample(8192);
        let stream = deflate_raw(&data, 12);
        let mut out = vec![0u8; 4096];
        decompress_zlib(&stream, &mut out).unwrap();
        assert_eq!(out, data[..4096]);
    }

    #[test]
    fn zstd_one_or_several_frames_decode() {
        let data = sample(65536);
        let mut one = zstd::bulk::compress(&data, 3).unwrap();
        one.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; data.len()];
        decompress_zstd(&one, &mut out).unwrap();
        assert_eq!(out, data);

        let mut several = Vec::new();
        for part in data.chunks(10000) {
            several.extend(zstd::bulk::compress(part, 1).unwrap());
        }
        several.extend_from_slice(&[0x77; 100]);
        out.fill(0);
        decompress_zstd(&several, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_errors_are_corrupt_not_panics() {
        let data = sample(4096);
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; 8192];
        // Too little data: the stream ends (trailing zeros are not a frame).
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0u8; 64]);
        assert!(decompress_zstd(&padded, &mut out).is_err());
        assert!(decompress_zstd(&frame, &mut out).is_err());
        // Truncated frame.
        let mut out = vec![0u8; 4096];
        assert!(decompress_zstd(&frame[..frame.len() / 2], &mut out).is_err());
        // More than one cluster in a frame.
        let big = zstd::bulk::compress(&sample(8192), 3).unwrap();
        assert!(decompress_zstd(&big, &mut out).is_err());
        assert!(decompress_zstd(&[0xff; 32], &mut out).is_err());
        assert!(decompress_zstd(&[], &mut out).is_err());
    }

    proptest! {
        #[test]
        fn codecs_round_trip(seed in any::<u8>(), cb in 9u32..=16, zstd in any::<bool>(), noise in proptest::collection::vec(any::<u8>(), 0..64)) {
            let cs = 1usize << cb;
            let mut data = compressible(seed, cs);
            for (i, n) in noise.iter().enumerate() { data[(i * 97) % cs] = *n; }
            let codec = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
            if let Some(s) = compress(codec, None, &data, cs) {
                prop_assert!(worth_storing(s.len(), cs));
                let mut padded = s.clone();
                padded.extend_from_slice(&[0xaa; 100]); // trailing bytes are ignored
                let mut out = vec![0u8; cs];
                decompress(codec, &padded, &mut out).unwrap();
                prop_assert_eq!(out, data);
            }
        }

        #[test]
        fn decompress_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300), zstd in any::<bool>()) {
            let mut out = vec![0u8; 4096];
            let codec = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
            let _ = decompress(codec, &input, &mut out);
        }
    }
}
