//! Verifying compressed clusters the way QEMU reads them (`block/qcow2-threads.c`).
//!
//! - zlib (raw deflate): one `inflate(Z_FINISH)` call into a cluster-sized buffer;
//!   success means the buffer was filled (`Z_STREAM_END`, or `Z_BUF_ERROR` with a
//!   full output because the input is only known to sector precision).
//! - zstd: `ZSTD_decompressStream` until exactly one cluster is produced; several
//!   frames are accepted; no progress, an error, or a frame left unfinished once the
//!   cluster is full is a failure.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer, ResetDirective};

use crate::error::{IoContext, Result};
use crate::format::header::CompressionType;
use crate::io::ReadAt;

/// A reusable decompressor with a cluster-sized output buffer.
pub(crate) struct Inflater {
    kind: CompressionType,
    out: Vec<u8>,
    zlib: Option<Decompress>,
    zstd: Option<DCtx<'static>>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("kind", &self.kind)
            .field("cluster_size", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Inflater {
    /// A decompressor for clusters of `cluster_size` bytes.
    pub fn new(kind: CompressionType, cluster_size: usize) -> Self {
        Inflater {
            kind,
            out: vec![0; cluster_size],
            zlib: None,
            zstd: None,
        }
    }

    /// Checks that `input` (the bytes QEMU would read for the descriptor) decompresses
    /// to a full cluster. Returns a description of the failure.
    pub fn verify(&mut self, input: &[u8]) -> Result<(), String> {
        match self.kind {
            CompressionType::Zlib => self.verify_zlib(input),
            CompressionType::Zstd => self.verify_zstd(input),
        }
    }

    fn verify_zlib(&mut self, input: &[u8]) -> Result<(), String> {
        let d = self.zlib.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let status = d
            .decompress(input, &mut self.out, FlushDecompress::Finish)
            .map_err(|e| format!("deflate stream is invalid: {e}"))?;
        let produced = d.total_out();
        let full = produced == self.out.len() as u64;
        match status {
            Status::StreamEnd | Status::BufError | Status::Ok if full => Ok(()),
            _ => Err(format!(
                "deflate stream yields {produced} of {} bytes",
                self.out.len()
            )),
        }
    }

    fn verify_zstd(&mut self, input: &[u8]) -> Result<(), String> {
        if self.zstd.is_none() {
            self.zstd =
                Some(DCtx::try_create().ok_or_else(|| "cannot create a zstd context".to_string())?);
        }
        let d = self.zstd.as_mut().expect("created above");
        d.reset(ResetDirective::SessionOnly)
            .map_err(|c| format!("zstd reset failed: {}", zstd::zstd_safe::get_error_name(c)))?;
        let size = self.out.len();
        let mut out = OutBuffer::around(&mut self.out[..]);
        let mut inp = InBuffer::around(input);
        let mut last_ret = 0usize;
        while out.pos() < size {
            let (in_before, out_before) = (inp.pos(), out.pos());
            last_ret = d.decompress_stream(&mut out, &mut inp).map_err(|c| {
                format!(
                    "zstd stream is invalid: {}",
                    zstd::zstd_safe::get_error_name(c)
                )
            })?;
            if inp.pos() <= in_before && out.pos() <= out_before {
                return Err(format!(
                    "zstd stream ends after {} of {size} bytes",
                    out.pos()
                ));
            }
        }
        if last_ret > 0 {
            return Err("zstd frame continues past the end of the cluster".into());
        }
        Ok(())
    }
}

/// Reads and decompresses each `(entry offset, host offset, length)` stream; returns
/// the indices of those that fail, with the reason, in order. Uses up to
/// `available_parallelism` threads for large batches.
pub(crate) fn verify_streams<R: ReadAt + ?Sized>(
    img: &R,
    inflater: &mut Inflater,
    kind: CompressionType,
    cluster_size: u64,
    streams: &[(u64, u64, u64)],
) -> Result<Vec<(usize, String)>> {
    const PER_THREAD_MIN: usize = 64;
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(streams.len() / PER_THREAD_MIN)
        .clamp(1, 16);
    if threads == 1 {
        return verify_range(img, inflater, streams, 0);
    }
    let chunk = streams.len().div_ceil(threads);
    let results: Vec<Result<Vec<(usize, String)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .chunks(chunk)
            .enumerate()
            .map(|(n, part)| {
                s.spawn(move || {
                    // cluster_size ≤ 2 MiB (validated header).
                    let mut inf = Inflater::new(kind, cluster_size as usize);
                    verify_range(img, &mut inf, part, n * chunk)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

fn verify_range<R: ReadAt + ?Sized>(
    img: &R,
    inflater: &mut Inflater,
    streams: &[(u64, u64, u64)],
    base: usize,
) -> Result<Vec<(usize, String)>> {
    let mut input = Vec::new();
    let mut failures = Vec::new();
    for (i, &(_, coffset, csize)) in streams.iter().enumerate() {
        // csize ≤ 2^13 · 512 = 4 MiB (the count field is cluster_bits − 8 bits wide).
        input.resize(csize as usize, 0);
        img.read_at_zero_fill(&mut input, coffset)
            .ctx(|| format!("reading the compressed cluster at {coffset:#x}"))?;
        if let Err(why) = inflater.verify(&input) {
            failures.push((base + i, why));
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = vec![0; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 7 % 251) as u8 ^ (i / 97) as u8)
            .collect()
    }

    #[test]
    fn a_full_deflate_stream_with_trailing_bytes_passes() {
        let data = sample(4096);
        let mut s = deflate(&data);
        s.extend_from_slice(&[0xaa; 300]);
        let mut inf = Inflater::new(CompressionType::Zlib, 4096);
        assert_eq!(inf.verify(&s), Ok(()));
    }

    #[test]
    fn a_truncated_deflate_stream_fails() {
        let data = sample(4096);
        let s = deflate(&data);
        let mut inf = Inflater::new(CompressionType::Zlib, 4096);
        assert!(inf.verify(&s[..s.len() / 2]).is_err());
        // The context is reusable after a failure.
        assert_eq!(inf.verify(&s), Ok(()));
    }

    #[test]
    fn a_deflate_stream_of_less_than_a_cluster_fails() {
        let s = deflate(&sample(1000));
        let mut inf = Inflater::new(CompressionType::Zlib, 4096);
        assert!(inf.verify(&s).is_err());
    }

    #[test]
    fn zstd_accepts_one_cluster_in_two_frames_and_rejects_short_streams() {
        let data = sample(8192);
        let mut two = zstd::bulk::compress(&data[..3000], 3).unwrap();
        two.extend(zstd::bulk::compress(&data[3000..], 3).unwrap());
        let mut inf = Inflater::new(CompressionType::Zstd, 8192);
        assert_eq!(inf.verify(&two), Ok(()));
        let one = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(inf.verify(&one), Ok(()));
        assert!(inf.verify(&one[..one.len() - 10]).is_err());
        assert!(inf.verify(&[0u8; 64]).is_err());
        assert_eq!(inf.verify(&one), Ok(()));
        // A frame holding more than a cluster is unfinished when the cluster is full.
        let big = zstd::bulk::compress(&sample(9000), 3).unwrap();
        assert!(inf.verify(&big).is_err());
    }
}
