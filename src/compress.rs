//! Cluster compression codecs: raw deflate ("zlib" in QEMU) and zstd.
//!
//! Writing mirrors QEMU: deflate with a 4 KiB window (window bits 12), no zlib
//! header, one `Z_FINISH`; zstd as one frame with the default parameters. A stream
//! is kept only if it saves space (see [`worth_storing`]). One difference: zlib's
//! default level here is [`ZLIB_DEFAULT_LEVEL`] (5), not QEMU's 6.
//!
//! Reading mirrors QEMU too: raw inflate in one call into a cluster-sized buffer
//! (which also accepts 32 KiB-window streams), success when the output is full;
//! zstd frames are decoded until exactly one cluster has been produced. Output is
//! bounded by the cluster size whatever the input claims.

use std::cell::RefCell;
use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::error::{Error, Result};
use crate::format::header::CompressionType;

/// Compresses one cluster; `None` when that saves no space. The conversion's
/// workers and the writer share one such function per conversion.
pub type CompressFn = dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync;

/// The compressor of a conversion: `codec` at `level` for clusters of `cs`
/// bytes; with `probe`, zlib clusters that [`looks_incompressible`] are skipped
/// and counted in `skipped`.
pub fn compressor(
    codec: CompressionType,
    level: Option<i32>,
    cs: usize,
    probe: bool,
    skipped: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::sync::Arc<CompressFn> {
    let probe = probe && codec == CompressionType::Zlib;
    std::sync::Arc::new(move |data: &[u8]| {
        if probe && looks_incompressible(data) {
            skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        compress(codec, level, data, cs, false)
    })
}

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

/// The zlib level used when none is given: 5. In zlib-rs (as in zlib-ng) levels
/// 4 to 6 are one algorithm (`deflate_medium`) and differ in how far the match
/// finder searches: level 6 follows hash chains up to 128 candidates, level 5 up
/// to 32. On an ext4 image of real files (64 KiB clusters, 1.2 GiB of distinct
/// data) level 5 took 6% less CPU for 0.11% more output, where level 4 (chains of
/// 16) cost 1% and level 3 2% more bytes; docs/benchmarks.md, "Compression on
/// real file systems". `--compression-level 6` gives QEMU's level (and the
/// streams qdedup wrote before).
pub const ZLIB_DEFAULT_LEVEL: i32 = 5;

thread_local! {
    /// The compressors' output buffer, one per thread (grown to the largest
    /// bound seen, zeroed only when it grows).
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DEFLATE: RefCell<Option<(i32, Compress)>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// Smallest input the probe judges: below one 4 KiB chunk the margins for
/// random data's small-sample entropy are as large as what deflate can save,
/// and deflating a few hundred bytes is cheap anyway.
const PROBE_MIN: usize = 4096;
/// Bytes per histogram chunk of the incompressibility probe.
const PROBE_CHUNK: usize = 4096;
/// Deflate's window here (window bits 12): matches reach back at most this far.
const DEFLATE_WINDOW: usize = 4096;
/// Positions starting a 4-byte repeat (within the window) the probe must find to
/// call a cluster compressible by matches: about 64 repeated bytes. Random data
/// has almost none: a 4-byte repeat within 4 KiB turns up once in ~16 random
/// 64 KiB clusters.
const PROBE_MATCH_POSITIONS: usize = 60;

/// `c · log2(c)` for c in 0..=PROBE_CHUNK (entropy of a histogram without a
/// logarithm per bucket).
fn c_log2_c() -> &'static [f64] {
    static TABLE: OnceLock<Vec<f64>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=PROBE_CHUNK)
            .map(|c| {
                if c == 0 {
                    0.0
                } else {
                    c as f64 * (c as f64).log2()
                }
            })
            .collect()
    })
}

/// Whether raw deflate (4 KiB window) is unlikely to save a 512-byte sector on
/// `data`, judged at a fraction of deflate's cost (a histogram and a 4-byte match
/// scan, ~1.5 ns a byte, where level-6 deflate spends ~10 ns a byte on random
/// data). Deflate saves space in two ways, and the probe bounds both:
///
/// - **Literal coding** cannot beat the order-0 entropy of the bytes it codes.
///   The probe sums the entropy of each 4 KiB chunk (a finer split than any
///   deflate block, so a lower bound for one), and treats the cluster as
///   compressible when that bound saves 256 bytes more than random data's own
///   small-sample shortfall (~23 bytes a chunk, allowed 32).
/// - **Matches** replace repeated strings. The probe looks up every 4-byte
///   string in a small hash table of earlier positions and treats the cluster as
///   compressible as soon as 60 positions repeat a string seen within the deflate
///   window (about 64 repeated bytes; random data has ~0).
///
/// Data that passes neither is stored plain without trying deflate: the answer is
/// what deflate would have said unless its savings come from what the probe does
/// not see (3-byte matches, repeats the one-slot table lost, skew under the
/// margin), which on real data is a fraction of a sector. Inputs under 4 KiB are
/// never skipped. See docs/format.md, "Compression".
pub fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < PROBE_MIN {
        return false;
    }
    if entropy_saves_enough(data) {
        return false;
    }
    // Matches within the window, one candidate per hash slot.
    PROBE_TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let bits = (usize::BITS - data.len().leading_zeros() + 1).clamp(9, PROBE_HASH_BITS);
        let t = &mut t[..1 << bits];
        t.fill(0);
        match_positions(data, t, bits) < PROBE_MATCH_POSITIONS
    })
}

/// Whether the order-0 entropy bound, summed over 4 KiB chunks, saves at least
/// 256 bytes plus 32 a chunk (random data's small-sample shortfall) on `data`.
///
/// A chunk's entropy is at most 8 bits a byte, so each chunk's saving is ≥ 0 and
/// the running sum only grows: once it reaches the whole cluster's threshold the
/// answer is known, and the remaining chunks are not counted (compressible data,
/// text or code, gets there in its first chunk; random data is scanned to the
/// end, as before).
fn entropy_saves_enough(data: &[u8]) -> bool {
    let table = c_log2_c();
    let threshold = 256.0 + 32.0 * data.len().div_ceil(PROBE_CHUNK) as f64;
    let mut coded_bits = 0.0f64;
    let mut seen = 0usize;
    for chunk in data.chunks(PROBE_CHUNK) {
        let mut h = [[0u32; 256]; 4];
        let mut quads = chunk.chunks_exact(4);
        for q in &mut quads {
            h[0][q[0] as usize] += 1;
            h[1][q[1] as usize] += 1;
            h[2][q[2] as usize] += 1;
            h[3][q[3] as usize] += 1;
        }
        for &b in quads.remainder() {
            h[0][b as usize] += 1;
        }
        let sum: f64 = (0..256)
            .map(|i| table[(h[0][i] + h[1][i] + h[2][i] + h[3][i]) as usize])
            .sum();
        coded_bits += table[chunk.len()] - sum;
        seen += chunk.len();
        if seen as f64 - coded_bits / 8.0 >= threshold {
            return true;
        }
    }
    false
}

/// Positions whose next 4 bytes occurred earlier within the deflate window, as a
/// one-candidate-per-slot match finder sees them, counted up to
/// [`PROBE_MATCH_POSITIONS`]. A repeated run of L bytes adds about L − 3.
/// `t` has `1 << bits` zeroed slots.
fn match_positions(data: &[u8], t: &mut [u64], bits: u32) -> usize {
    let mask = (1usize << bits) - 1;
    let mut found = 0usize;
    for (i, w) in data.windows(4).enumerate() {
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let slot = (word.wrapping_mul(0x9E37_79B1) >> (32 - bits)) as usize & mask;
        // A slot holds the word and its position + 1 (0: empty), so that the
        // common case (no match) is one well-predicted comparison.
        let entry = t[slot];
        t[slot] = u64::from(word) << 32 | (i as u64 + 1);
        if (entry >> 32) as u32 == word && entry & 0xffff_ffff != 0 {
            let prev = (entry & 0xffff_ffff) as usize - 1;
            if i - prev <= DEFLATE_WINDOW {
                found += 1;
                if found >= PROBE_MATCH_POSITIONS {
                    break;
                }
            }
        }
    }
    found
}

/// log2 of the match finder's most hash slots (8 K slots of 8 bytes: 64 KiB);
/// smaller inputs use about two slots per byte.
const PROBE_HASH_BITS: u32 = 13;

thread_local! {
    static PROBE_TABLE: RefCell<Vec<u64>> = RefCell::new(vec![0; 1 << PROBE_HASH_BITS]);
}

/// Compresses one cluster. Returns `None` when the stream would not save space
/// (or the codec fails, which for in-memory compression means the same).
///
/// With `probe`, zlib clusters that [`looks_incompressible`] are not compressed
/// (`None` at once); zstd needs no probe (its own match finder gives up on
/// incompressible input at several GB/s).
pub fn compress(
    codec: CompressionType,
    level: Option<i32>,
    data: &[u8],
    cs: usize,
    probe: bool,
) -> Option<Vec<u8>> {
    if probe && codec == CompressionType::Zlib && looks_incompressible(data) {
        return None;
    }
    // Room for the worst case (zlib's deflateBound, zstd's compress bound): zlib-rs
    // panics when a stored block does not fit the output buffer, so never give it
    // less; whether the stream is worth storing is decided afterwards. The buffer
    // is the thread's, zeroed once: only the stream is copied out.
    let bound = data.len() + data.len() / 8 + 1024;
    let need = bound.max(zstd::zstd_safe::compress_bound(data.len()));
    OUT.with(|o| {
        let mut o = o.borrow_mut();
        if o.len() < need {
            o.resize(need, 0);
        }
        let out = &mut o[..need];
        let n = match codec {
            CompressionType::Zlib => {
                let level = level.unwrap_or(ZLIB_DEFAULT_LEVEL).clamp(0, 9);
                DEFLATE.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.as_ref().map(|(l, _)| *l) != Some(level) {
                        *c = Some((
                            level,
                            Compress::new_with_window_bits(
                                Compression::new(level as u32),
                                false,
                                12,
                            ),
                        ));
                    }
                    let (_, z) = c.as_mut().expect("just set");
                    z.reset();
                    match z.compress(data, out, FlushCompress::Finish) {
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
                    z.compress_to_buffer(data, out).ok()
                })?
            }
        };
        // `n` comes from the codec; never trust it past the buffer.
        let stream = out.get(..n)?;
        worth_storing(n, cs).then(|| stream.to_vec())
    })
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
        assert!(compress(CompressionType::Zlib, None, &data, 65536, false).is_none());
        assert!(compress(CompressionType::Zstd, None, &data, 65536, false).is_none());
    }

    #[test]
    fn truncated_stream_is_corrupt() {
        let data = compressible(3, 4096);
        for codec in [CompressionType::Zlib, CompressionType::Zstd] {
            let s = compress(codec, None, &data, 4096, false).unwrap();
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

    fn random(seed: u64, n: usize) -> Vec<u8> {
        let mut rng = crate::sample::Rng::new(seed);
        let mut d = vec![0u8; n];
        rng.fill(&mut d);
        d
    }

    /// A cluster of random bytes reshaped by `edits`, each (kind, a, b): a zero
    /// run, a copy from up to 4 KiB back, a stretch over a smaller alphabet, or
    /// a stretch of 4-byte values drawn from a small set.
    fn shaped(seed: u64, cs: usize, edits: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = random(seed, cs);
        let mut rng = crate::sample::Rng::new(seed ^ 0x5eed);
        for &(kind, a, b) in edits {
            let at = a as usize % cs;
            let len = (b as usize % 3000 + 1).min(cs - at);
            match kind % 4 {
                0 => d[at..at + len].fill(0),
                1 => {
                    let back = (b as usize % 4096).clamp(1, at.max(1));
                    if at >= back {
                        for i in at..at + len {
                            d[i] = d[i - back];
                        }
                    }
                }
                2 => {
                    let k = 128 + u64::from(b % 129);
                    for x in &mut d[at..at + len] {
                        *x = rng.below(k) as u8;
                    }
                }
                _ => {
                    let set: Vec<u64> = (0..=(b % 600)).map(|_| rng.next_u64()).collect();
                    for c in d[at..at + len].chunks_mut(4) {
                        let v = set[rng.below(set.len() as u64) as usize].to_le_bytes();
                        c.copy_from_slice(&v[..c.len()]);
                    }
                }
            }
        }
        d
    }

    #[test]
    fn probe_skips_random_clusters_and_only_them() {
        for cs in [4096, 65536, 2 << 20] {
            let d = random(cs as u64, cs);
            assert!(looks_incompressible(&d), "random {cs}");
            assert!(compress(CompressionType::Zlib, None, &d, cs, false).is_none());
            // A run of zeros, a repeated 1 KiB block, text, a smaller
            // alphabet: each is compressible, and the probe must see it.
            let mut z = d.clone();
            z[100..100 + (cs / 4).min(8192)].fill(0);
            let mut rep = d.clone();
            for i in 1024..cs.min(16384) {
                rep[i] = rep[i - 1024];
            }
            let text = compressible(1, cs);
            let small: Vec<u8> = d.iter().map(|b| b % 64).collect();
            for (name, x) in [
                ("zeros", &z),
                ("repeat", &rep),
                ("text", &text),
                ("alphabet", &small),
            ] {
                assert!(!looks_incompressible(x), "{name} at {cs}");
                assert!(
                    compress(CompressionType::Zlib, None, x, cs, false).is_some(),
                    "{name} at {cs}"
                );
            }
        }
        // Under 4 KiB the probe never skips.
        assert!(!looks_incompressible(&random(1, 2048)));
    }

    #[test]
    fn probe_does_not_touch_zstd() {
        let d = compressible(2, 65536);
        assert_eq!(
            compress(CompressionType::Zstd, None, &d, 65536, true),
            compress(CompressionType::Zstd, None, &d, 65536, false)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// The probe changes speed, not output: with or without it, a cluster
        /// compresses to the same stream or is stored plain.
        #[test]
        fn probe_agrees_with_deflate(seed in any::<u64>(), big in any::<bool>(),
                edits in proptest::collection::vec((any::<u8>(), any::<u32>(), any::<u32>()), 0..6)) {
            let cs = if big { 65536 } else { 4096 };
            let d = shaped(seed, cs, &edits);
            prop_assert_eq!(
                compress(CompressionType::Zlib, None, &d, cs, true),
                compress(CompressionType::Zlib, None, &d, cs, false)
            );
        }
    }

    /// The probe's entropy bound as it was first written: every chunk summed,
    /// then compared with the threshold.
    fn entropy_saves_enough_full_sum(data: &[u8]) -> bool {
        let mut coded_bits = 0.0f64;
        let mut chunks = 0usize;
        for chunk in data.chunks(PROBE_CHUNK) {
            let mut h = [0usize; 256];
            for &b in chunk {
                h[b as usize] += 1;
            }
            let n = chunk.len() as f64;
            coded_bits += h
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| -(c as f64) * (c as f64 / n).log2())
                .sum::<f64>();
            chunks += 1;
        }
        data.len() as f64 - coded_bits / 8.0 >= 256.0 + 32.0 * chunks as f64
    }

    /// Stopping the entropy sum once it reaches the threshold gives the same
    /// answer as summing every chunk: random clusters reshaped by zero runs,
    /// copies, small alphabets and small sets of values, of whole chunks or not.
    #[test]
    fn entropy_bound_stops_early_with_the_same_answer() {
        let mut rng = crate::sample::Rng::new(19);
        let (mut yes, mut no) = (0, 0);
        for case in 0..300u64 {
            let len = 4096 + rng.below(70000 - 4096) as usize;
            let edits: Vec<(u8, u32, u32)> = (0..rng.below(4))
                .map(|_| {
                    let x = rng.next_u64();
                    (x as u8, (x >> 8) as u32, (x >> 40) as u32)
                })
                .collect();
            let d = shaped(case, len, &edits);
            let want = entropy_saves_enough_full_sum(&d);
            assert_eq!(
                entropy_saves_enough(&d),
                want,
                "case {case}: {len} bytes, {edits:?}"
            );
            if want {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(
            yes >= 30 && no >= 30,
            "{yes} skewed, {no} not: too few of one kind"
        );
    }

    #[test]
    fn entropy_bound_on_random_and_text() {
        for cs in [4096, 65536, 2 << 20] {
            let r = random(cs as u64 + 1, cs);
            assert!(!entropy_saves_enough(&r), "random {cs}");
            assert!(!entropy_saves_enough_full_sum(&r), "random {cs}");
            let t = compressible(3, cs);
            assert!(entropy_saves_enough(&t), "text {cs}");
            assert!(entropy_saves_enough_full_sum(&t), "text {cs}");
        }
    }

    proptest! {
        #[test]
        fn codecs_round_trip(seed in any::<u8>(), cb in 9u32..=16, zstd in any::<bool>(), noise in proptest::collection::vec(any::<u8>(), 0..64)) {
            let cs = 1usize << cb;
            let mut data = compressible(seed, cs);
            for (i, n) in noise.iter().enumerate() { data[(i * 97) % cs] = *n; }
            let codec = if zstd { CompressionType::Zstd } else { CompressionType::Zlib };
            if let Some(s) = compress(codec, None, &data, cs, false) {
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
