//! `estimate`: a dry run of `convert` that reads and hashes the input once and
//! predicts, for one or several cluster sizes, the size of the file qdedup would
//! write and the size `qemu-img convert` would write with the same options.
//!
//! Exact mode (no sampling): the input goes through the real pipeline (reader,
//! workers) at the smallest cluster size asked for. For every cluster size, two
//! real [`ImageWriter`]s write into a [`NullSink`] that only counts: one deduplicating
//! (its final length *is* the output `convert` would write) and one without dedup,
//! whose data area feeds the qemu-img layout model ([`qemu_img_size`]). Larger
//! cluster sizes are assembled from the smaller clusters of the same batches, so
//! the input is read once. Compression results are computed once per distinct
//! content and size.
//!
//! Sampling mode (`sample = Some(p)`): only one unit (of the largest cluster
//! size) in every `round(1/p)` is read, chosen per stratum by a seeded hash. The
//! sampled contents' multiplicities give an estimate of the distinct contents of
//! the whole input (see `docs/design.md`), with an approximate 95% interval.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::convert::pipeline;
use crate::convert::ConvertOptions;
use crate::dedup::{hash_cluster, is_zero, Hash};
use crate::error::{Error, Result};
use crate::format::refcount;
use crate::io::WriteAt;
use crate::source::{BlockStatus, Source};
use crate::writer::batch::{Batch, Stream};
use crate::writer::{ClusterIn, ImageWriter, MetadataLayout};

use super::qemu_writes::QemuWrites;

/// A [`WriteAt`] that discards data and remembers how long the file would be.
#[derive(Debug, Default)]
pub struct NullSink {
    len: AtomicU64,
}

impl NullSink {
    /// The length the file would have.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl WriteAt for NullSink {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.len
            .fetch_max(offset + buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.len.store(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Options of [`estimate`].
#[derive(Debug, Clone)]
pub struct EstimateOptions {
    /// The conversion being estimated (cluster size, refcount width, compression,
    /// workers). Its cluster size is the one of the top-level figures.
    pub convert: ConvertOptions,
    /// log2 of further cluster sizes to tabulate (the primary one is added).
    pub extra_cluster_bits: Vec<u32>,
    /// Read only this fraction of the input (0 < p < 1).
    pub sample: Option<f64>,
    /// Seed of the sampling.
    pub seed: u64,
}

/// Figures for one cluster size.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct SizeEstimate {
    /// Cluster size.
    pub cluster_size: u64,
    /// Bytes of the file qdedup would write.
    pub estimated_size: u64,
    /// Bytes of the file `qemu-img convert -O qcow2` would write (model).
    pub qemu_img_size: u64,
    /// `qemu-img-size − estimated-size` (negative if qdedup's file is larger).
    pub saved_bytes: i64,
    /// `saved-bytes` as a percentage of `qemu-img-size`.
    pub saved_percent: f64,
    /// Guest clusters.
    #[serde(rename = "guest-clusters")]
    pub clusters_total: u64,
    /// Guest clusters reading as zeros (estimated when sampling).
    #[serde(rename = "unallocated-clusters")]
    pub clusters_zero: u64,
    /// Distinct non-zero contents (stored once each).
    #[serde(rename = "stored-copies")]
    pub clusters_unique: u64,
    /// Non-zero clusters that would share a stored copy.
    #[serde(rename = "duplicate-clusters")]
    pub clusters_duplicate: u64,
    /// New copies stored compressed.
    #[serde(rename = "compressed-streams")]
    pub clusters_compressed: u64,
    /// Approximate 95% interval of `estimated-size` (sampling only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_size_95: Option<[u64; 2]>,
}

/// What was sampled.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct SampleInfo {
    /// Fraction of units read (1 / stratum size).
    pub fraction: f64,
    /// Sampling unit in bytes (the largest cluster size).
    pub unit: u64,
    /// Units read.
    pub units_sampled: u64,
    /// Seed.
    pub seed: u64,
}

/// The report of [`estimate`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EstimateReport {
    /// Input format.
    pub input_format: String,
    /// Virtual size.
    pub virtual_size: u64,
    /// Primary cluster size (the figures below are for it).
    pub cluster_size: u64,
    /// Bytes of the file qdedup would write.
    pub estimated_size: u64,
    /// Bytes `qemu-img convert` would write with the same options (model).
    pub qemu_img_size: u64,
    /// `qemu-img-size − estimated-size`.
    pub saved_bytes: i64,
    /// As a percentage of `qemu-img-size`.
    pub saved_percent: f64,
    /// Approximate 95% interval of `estimated-size` (sampling only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_size_95: Option<[u64; 2]>,
    /// Compression codec, if any.
    pub compression: Option<String>,
    /// Sampling, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleInfo>,
    /// One row per cluster size, ascending.
    pub table: Vec<SizeEstimate>,
    /// Guest bytes read.
    pub bytes_read: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Size of a fresh `qemu-img convert -O qcow2` output: header, refcount table
/// and first refcount block, L1 table (clusters 0..3+, as `qcow2_co_create`
/// lays them out), then L2 tables and data clusters (the clusters qemu-img
/// writes, see `inspect::qemu_writes`) interleaved, and further
/// self-describing refcount blocks as the file grows. Assumes the refcount table
/// does not have to grow (true up to 2^(2·cluster_bits − 3 − refcount_order + 3)
/// clusters, e.g. 16 TiB at 64 KiB clusters and 16-bit refcounts).
///
/// `data_tail` is the number of bytes used in the last data cluster when it is
/// only partly filled by compressed streams (0 = full): qemu-img then leaves the
/// file ending after the last stream, rounded up to 512 bytes.
pub fn qemu_img_size(
    cluster_bits: u32,
    refcount_order: u32,
    virtual_size: u64,
    data_clusters: u64,
    l2_tables: u64,
    data_tail: u64,
) -> u64 {
    let cs = 1u64 << cluster_bits;
    let l1_entries = virtual_size.div_ceil(cs).div_ceil(cs / 8);
    // A 0-byte image has no L1 cluster.
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let epb = refcount::entries_per_block(cluster_bits, refcount_order);
    let fixed = 2 + l1_clusters + l2_tables + data_clusters;
    let mut rb = 1u64;
    while (fixed + rb).div_ceil(epb) > rb {
        rb = (fixed + rb).div_ceil(epb);
    }
    let rt = (rb * 8).div_ceil(cs).max(1);
    if data_clusters == 0 && l2_tables == 0 && rb == 1 && rt == 1 {
        // Nothing written after qcow2_co_create: the file ends with the L1
        // table's last entry, not with its cluster.
        return 3 * cs + l1_entries * 8;
    }
    let size = (fixed - 1 + rt + rb) * cs;
    if data_clusters > 0 && data_tail > 0 && data_tail < cs {
        size - cs + data_tail.div_ceil(512) * 512
    } else {
        size
    }
}

/// qdedup's own layout ([`MetadataLayout`], as the writer lays it out), for the
/// sampling model.
fn qdedup_size(
    cluster_bits: u32,
    refcount_order: u32,
    virtual_size: u64,
    data_clusters: u64,
    l2_tables: u64,
) -> u64 {
    let l = MetadataLayout::compute(
        cluster_bits,
        refcount_order,
        virtual_size,
        1 + data_clusters,
        l2_tables,
    );
    l.total_clusters << cluster_bits
}

type Compressor = std::sync::Arc<crate::compress::CompressFn>;

/// Sample statistics of one cluster size.
#[derive(Default)]
struct SampleStats {
    /// Sample multiplicity of each content, and its stored bytes.
    counts: HashMap<Hash, (u32, u32)>,
    nonzero: u64,
    /// Clusters `qemu-img convert -S 4k` writes: the non-zero ones, and for
    /// clusters under 4 KiB every cluster of a 4 KiB block holding data.
    qemu_written: u64,
    l2_ranges: HashSet<u64>,
}

/// Per cluster size: two writers, the compression memo, and the assembly buffer.
struct SizeState<'a> {
    cb: u32,
    /// log2 of the sampling unit (the largest cluster size).
    unit_bits: u32,
    vsize: u64,
    /// Primary clusters per cluster of this size.
    k: u64,
    writers: Option<(ImageWriter<'a>, ImageWriter<'a>)>,
    compressor: Option<Compressor>,
    memo: HashMap<Hash, Option<u32>>,
    scratch: Vec<u8>,
    acc: Vec<u8>,
    acc_idx: Option<u64>,
    acc_dirty: bool,
    l2_tables: u64,
    last_l1: Option<u64>,
    stats: SampleStats,
    /// Sampling, clusters under 4 KiB: the 4 KiB block last counted in
    /// `stats.qemu_written`.
    last_block: Option<u64>,
}

impl SizeState<'_> {
    fn cs(&self) -> u64 {
        1 << self.cb
    }

    /// One non-zero-or-zero cluster `j` of this size with its bytes.
    fn feed(&mut self, j: u64, data: &[u8], hash: Option<Hash>, hint: Stream<&[u8]>) -> Result<()> {
        if hash.is_none() && is_zero(data) {
            return Ok(());
        }
        let hash = hash.unwrap_or_else(|| hash_cluster(data));
        let l1 = j / (self.cs() / 8);
        if self.last_l1 != Some(l1) {
            self.last_l1 = Some(l1);
            self.l2_tables += 1;
        }
        // The compression outcome of this content (computed once).
        let outcome: Option<Option<u32>> = if let Some(c) = &self.compressor {
            let o = if let Some(o) = self.memo.get(&hash) {
                *o
            } else {
                let o = match hint {
                    Stream::Some(s) => Some(s.len() as u32),
                    Stream::NotWorth => None,
                    Stream::NotTried => c(data).map(|s| s.len() as u32),
                };
                self.memo.insert(hash, o);
                o
            };
            Some(o)
        } else {
            None
        };
        let stored = match outcome {
            Some(Some(len)) => len,
            _ => self.cs() as u32,
        };
        if let Some((dw, pw)) = &mut self.writers {
            // Only the stream's length matters to a writer into a NullSink.
            let stream = match outcome {
                None => Stream::NotTried,
                Some(None) => Stream::NotWorth,
                Some(Some(len)) => Stream::Some(&self.scratch[..len as usize]),
            };
            let c = ClusterIn::Data { hash, data, stream };
            dw.accept(j, data, [c])?;
            pw.accept(j, data, [c])?;
        } else {
            let e = self.stats.counts.entry(hash).or_insert((0, stored));
            e.0 += 1;
            self.stats.nonzero += 1;
            self.stats.l2_ranges.insert(l1);
            self.stats.qemu_written += self.qemu_block_clusters(j);
        }
        Ok(())
    }

    /// Sampling: the clusters `qemu-img convert` writes because non-zero cluster
    /// `j` is (see `inspect::qemu_writes`): `j` itself, or with
    /// clusters under 4 KiB the whole 4 KiB block around it once (exact when every
    /// request qemu-img makes is 4 KiB-aligned, as for raw files). Needs sampling
    /// units of at least 4 KiB; smaller ones count `j` alone.
    fn qemu_block_clusters(&mut self, j: u64) -> u64 {
        if self.cb >= QEMU_SPARSE_BITS || self.unit_bits < QEMU_SPARSE_BITS {
            return 1;
        }
        let block = j >> (QEMU_SPARSE_BITS - self.cb);
        if self.last_block == Some(block) {
            return 0;
        }
        self.last_block = Some(block);
        let start = block << QEMU_SPARSE_BITS;
        let len = (1u64 << QEMU_SPARSE_BITS).min(self.vsize.saturating_sub(start));
        len.div_ceil(self.cs())
    }

    /// Adds primary cluster `g` (of `pcs` bytes) to the cluster being assembled.
    fn assemble(&mut self, g: u64, pcs: usize, data: &[u8]) -> Result<()> {
        let j = g / self.k;
        if self.acc_idx != Some(j) {
            self.flush()?;
            self.acc_idx = Some(j);
        }
        let at = (g % self.k) as usize * pcs;
        self.acc[at..at + pcs].copy_from_slice(data);
        self.acc_dirty = true;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(j) = self.acc_idx.take() {
            if self.acc_dirty {
                let acc = std::mem::take(&mut self.acc);
                let r = self.feed(j, &acc, None, Stream::NotTried);
                self.acc = acc;
                self.acc.fill(0);
                self.acc_dirty = false;
                r?;
            }
        }
        Ok(())
    }
}

/// log2 of qemu-img convert's default `-S` (4 KiB): with smaller clusters it
/// writes zero clusters next to data.
const QEMU_SPARSE_BITS: u32 = 12;

/// Reports unsampled units as zeros, so the pipeline skips them unread.
struct SampledSource<'a> {
    inner: &'a dyn Source,
    unit: u64,
    stratum: u64,
    seed: u64,
}

impl SampledSource<'_> {
    /// The unit chosen in stratum `t`.
    fn chosen(&self, t: u64) -> u64 {
        let h = blake3::hash(&[self.seed.to_le_bytes(), t.to_le_bytes()].concat());
        let r = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        t * self.stratum + r % self.stratum
    }

    fn sampled(&self, u: u64) -> bool {
        self.chosen(u / self.stratum) == u
    }

    fn units(&self) -> u64 {
        self.inner.virtual_size().div_ceil(self.unit)
    }

    fn units_sampled(&self) -> u64 {
        let n = self.units();
        let full = n / self.stratum;
        let last = u64::from(n % self.stratum != 0 && self.chosen(full) < n);
        full + last
    }
}

impl Source for SampledSource<'_> {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
        let u = offset / self.unit;
        let end = offset.saturating_add(max_len).min(self.virtual_size());
        if self.sampled(u) {
            let unit_end = ((u + 1) * self.unit).min(end);
            return self.inner.block_status(offset, unit_end - offset);
        }
        let t = u / self.stratum;
        let next = if self.chosen(t) > u {
            self.chosen(t)
        } else {
            self.chosen(t + 1)
        };
        let zero_end = (next * self.unit).min(end);
        Ok((BlockStatus::Zero, zero_end - offset))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
}

/// Largest sample count used to fit the rate of repeated contents (counts above
/// it come from contents so frequent they are never missed).
const MAX_FIT_COUNT: u32 = 8;
/// Smallest rate the fit may return (a few contents seen exactly twice would
/// otherwise imply an unbounded number of hidden repeats).
const MIN_RATE: f64 = 0.5;

/// λ such that a Poisson(λ) variable, conditioned on 2 ≤ X ≤ MAX_FIT_COUNT,
/// has mean `m` (bisection; the mean increases with λ).
fn truncated_poisson_rate(m: f64) -> f64 {
    let mean = |l: f64| {
        let (mut num, mut den, mut pk) = (0.0, 0.0, (-l).exp());
        for k in 1..=MAX_FIT_COUNT {
            pk *= l / f64::from(k);
            if k >= 2 {
                num += f64::from(k) * pk;
                den += pk;
            }
        }
        num / den
    };
    let (mut lo, mut hi) = (1e-3, 20.0);
    for _ in 0..60 {
        let mid = f64::midpoint(lo, hi);
        if mean(mid) < m {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    f64::midpoint(lo, hi)
}

/// The sampling estimator for one cluster size (see `docs/design.md`).
fn from_sample(
    st: &SizeState<'_>,
    opts: &ConvertOptions,
    vsize: u64,
    sampled_clusters: u64,
) -> SizeEstimate {
    let cs = st.cs();
    let total = vsize.div_ceil(cs);
    let s = &st.stats;
    let p = (sampled_clusters as f64 / total as f64).clamp(f64::MIN_POSITIVE, 1.0);
    // f1, f2, contents seen ≥ 2 times; and for the fit, contents seen 2..=8 times.
    let (mut f1, mut f2, mut seen_rep, mut fit_n, mut fit_sum) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for &(c, _) in s.counts.values() {
        match c {
            1 => f1 += 1.0,
            2 => f2 += 1.0,
            _ => {}
        }
        if c >= 2 {
            seen_rep += 1.0;
        }
        if (2..=MAX_FIT_COUNT).contains(&c) {
            fit_n += 1.0;
            fit_sum += f64::from(c);
        }
    }
    // Repeated contents with a small sample rate λ hide among the singletons:
    // with Poisson counts, f1_rep = 2·f2/λ and unseen = 2·f2/λ², where λ solves
    // the mean of the zero-and-one-truncated Poisson over contents seen 2..=8 times.
    let (f1_rep, unseen) = if f2 > 0.0 && p < 1.0 {
        let lambda = truncated_poisson_rate(fit_sum / fit_n).max(MIN_RATE);
        let f1_rep = (2.0 * f2 / lambda).min(f1);
        (f1_rep, (2.0 * f2 / (lambda * lambda)).min(f1_rep))
    } else {
        (0.0, 0.0)
    };
    let unique_singletons = (f1 - f1_rep).max(0.0);
    let distinct = unique_singletons / p + seen_rep + f1_rep + unseen;
    let nonzero = s.nonzero as f64 / p;
    // Without compression qemu-img writes clusters, -S 4k included.
    let qemu_written = s.qemu_written as f64 / p;
    // Stored bytes: mean over sampled contents (dedup) and over sampled clusters (qemu).
    let n_contents = s.counts.len().max(1) as f64;
    let (mut comp_c, mut comp_b, mut comp_cl, mut comp_clb) = (0f64, 0f64, 0f64, 0f64);
    for &(c, b) in s.counts.values() {
        if u64::from(b) < cs {
            comp_c += 1.0;
            comp_b += f64::from(b);
            comp_cl += f64::from(c);
            comp_clb += f64::from(c) * f64::from(b);
        }
    }
    let nz_sampled = s.nonzero.max(1) as f64;
    let data_clusters = |n: f64, frac_comp: f64, mean_comp: f64| -> u64 {
        let plain = n * (1.0 - frac_comp);
        let packed = n * frac_comp * mean_comp / cs as f64;
        (plain + packed).ceil() as u64
    };
    let d_frac = comp_c / n_contents;
    let d_mean = if comp_c > 0.0 { comp_b / comp_c } else { 0.0 };
    let q_frac = comp_cl / nz_sampled;
    let q_mean = if comp_cl > 0.0 {
        comp_clb / comp_cl
    } else {
        0.0
    };
    let ranges = vsize.div_ceil(cs).div_ceil(cs / 8);
    let l2 = (s.l2_ranges.len() as u64).min(ranges);
    let order = opts.refcount_order;
    let est = qdedup_size(
        st.cb,
        order,
        vsize,
        data_clusters(distinct, d_frac, d_mean),
        l2,
    );
    let qemu_clusters = if opts.compression.is_some() {
        data_clusters(nonzero, q_frac, q_mean)
    } else {
        qemu_written.ceil() as u64
    };
    let qemu = qemu_img_size(st.cb, order, vsize, qemu_clusters, l2, 0);
    // The dominant variance: unique singletons are a binomial sample of the unique contents.
    // The fit of the hidden repeats adds its own error (f2 is a Poisson count and
    // λ is fitted from `fit_n` contents); it too is scaled by 1/p.
    let rep_rel = if f2 > 0.0 {
        (1.0 / f2 + 1.0 / fit_n.max(1.0)).sqrt()
    } else {
        0.0
    };
    let sd = ((unique_singletons * (1.0 - p)) + (f1_rep * rep_rel).powi(2)).sqrt() / p;
    let per = cs as f64 * ((1.0 - d_frac) + d_frac * d_mean / cs as f64);
    let half = 1.96 * sd * per;
    let lo = (est as f64 - half).max(0.0) as u64;
    let hi = (est as f64 + half) as u64;
    let nonzero_u = nonzero.round() as u64;
    let distinct_u = (distinct.round() as u64).min(nonzero_u);
    row(
        cs,
        est,
        qemu,
        total,
        total.saturating_sub(nonzero_u),
        distinct_u,
        nonzero_u - distinct_u,
        (distinct * d_frac).round() as u64,
        Some([lo, hi]),
    )
}

#[allow(clippy::too_many_arguments)] // one row of the table, field by field
fn row(
    cs: u64,
    est: u64,
    qemu: u64,
    total: u64,
    zero: u64,
    unique: u64,
    dup: u64,
    compressed: u64,
    ci: Option<[u64; 2]>,
) -> SizeEstimate {
    // File sizes are far below 2^63.
    let saved = i64::try_from(qemu).unwrap_or(i64::MAX) - i64::try_from(est).unwrap_or(i64::MAX);
    SizeEstimate {
        cluster_size: cs,
        estimated_size: est,
        qemu_img_size: qemu,
        saved_bytes: saved,
        saved_percent: if qemu == 0 {
            0.0
        } else {
            100.0 * saved as f64 / qemu as f64
        },
        clusters_total: total,
        clusters_zero: zero,
        clusters_unique: unique,
        clusters_duplicate: dup,
        clusters_compressed: compressed,
        estimated_size_95: ci,
    }
}

/// Estimates the conversion of the image at `input`, opened as
/// `opts.convert.input` says (see the module docs).
pub fn estimate(input: &std::path::Path, opts: &EstimateOptions) -> Result<EstimateReport> {
    let src = crate::source::open(input, &opts.convert.input)?;
    estimate_source(src.as_ref(), opts)
}

/// Estimates the conversion of `src` (see the module docs).
pub fn estimate_source(src: &dyn Source, opts: &EstimateOptions) -> Result<EstimateReport> {
    let start = Instant::now();
    let copts = &opts.convert;
    let mut bits: Vec<u32> = opts.extra_cluster_bits.clone();
    bits.push(copts.cluster_bits);
    bits.sort_unstable();
    bits.dedup();
    let min_bits = bits[0];
    let max_bits = *bits.last().expect("at least the primary size");
    let vsize = src.virtual_size();
    if let Some(p) = opts.sample {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--sample must be in (0, 1], not {p}"
            )));
        }
    }
    let sampled = opts.sample.map(|p| SampledSource {
        inner: src,
        unit: 1 << max_bits,
        stratum: ((1.0 / p).round() as u64).max(1),
        seed: opts.seed,
    });
    let sinks: Vec<(NullSink, NullSink)> = bits.iter().map(|_| Default::default()).collect();
    let skipped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let make_compressor = |cb: u32| -> Option<Compressor> {
        copts.compression.map(|c| {
            crate::compress::compressor(
                c,
                copts.compression_level,
                1 << cb,
                copts.compress_probe,
                std::sync::Arc::clone(&skipped),
            )
        })
    };
    let mut states = Vec::with_capacity(bits.len());
    for (&cb, (ds, ps)) in bits.iter().zip(&sinks) {
        let writers = if sampled.is_none() {
            let w = copts.writer(vsize).cluster_size(1 << cb);
            Some((
                w.clone().dedup(true).create(ds)?,
                w.dedup(false).create(ps)?,
            ))
        } else {
            None
        };
        states.push(SizeState {
            cb,
            unit_bits: max_bits,
            vsize,
            k: 1 << (cb - min_bits),
            writers,
            compressor: make_compressor(cb),
            memo: HashMap::new(),
            scratch: vec![0u8; 1 << cb],
            acc: if cb > min_bits {
                vec![0u8; 1 << cb]
            } else {
                Vec::new()
            },
            acc_idx: None,
            acc_dirty: false,
            l2_tables: 0,
            last_l1: None,
            stats: SampleStats::default(),
            last_block: None,
        });
    }
    // Exact mode, uncompressed, clusters under 4 KiB: replay qemu-img's writes.
    let small: Vec<u32> = bits
        .iter()
        .copied()
        .filter(|&b| b < QEMU_SPARSE_BITS)
        .collect();
    let mut replay = (sampled.is_none() && copts.compression.is_none() && !small.is_empty())
        .then(|| QemuWrites::new(src, &small));
    let mut popts = copts.clone();
    popts.cluster_bits = min_bits;
    popts.dedup = true;
    let inline = make_compressor(min_bits);
    let pcs = 1usize << min_bits;
    let mut deliver = |b: &Batch| -> Result<()> {
        for (i, c) in b.clusters(pcs).enumerate() {
            let ClusterIn::Data { hash, data, stream } = c else {
                continue;
            };
            let g = b.first_cluster + i as u64;
            if let Some(r) = &mut replay {
                r.add(g * pcs as u64, data);
            }
            for st in &mut states {
                if st.cb == min_bits {
                    st.feed(g, data, Some(hash), stream)?;
                } else {
                    st.assemble(g, pcs, data)?;
                }
            }
        }
        if let Some(r) = &mut replay {
            r.advance((b.first_cluster + b.kinds.len() as u64) * pcs as u64)?;
        }
        Ok(())
    };
    let input: &dyn Source = match &sampled {
        Some(s) => s,
        None => src,
    };
    let bytes_read = pipeline::run(input, &popts, inline.as_deref(), &mut deliver)?;
    let written: Vec<(u32, u64)> = match replay {
        Some(r) => small.iter().copied().zip(r.finish()?).collect(),
        None => Vec::new(),
    };
    let mut table = Vec::new();
    for mut st in states {
        st.flush()?;
        let cs = st.cs();
        let total = vsize.div_ceil(cs);
        let r = if let Some((dw, pw)) = st.writers.take() {
            let d = dw.finish()?;
            let p = pw.finish()?;
            let nonzero = d.unique_clusters + d.duplicate_clusters;
            // Clusters under 4 KiB: the replay's count (≥ the non-zero ones).
            let data_clusters = written
                .iter()
                .find(|(b, _)| *b == st.cb)
                .map_or(p.host_data_clusters, |&(_, n)| n);
            let qemu = qemu_img_size(
                st.cb,
                copts.refcount_order,
                vsize,
                data_clusters,
                st.l2_tables,
                p.data_end % cs,
            );
            row(
                cs,
                d.file_size,
                qemu,
                total,
                total - nonzero,
                d.unique_clusters,
                d.duplicate_clusters,
                d.compressed_clusters,
                None,
            )
        } else {
            let s = sampled.as_ref().expect("sampling mode");
            let units = s.units_sampled();
            let per_unit = 1u64 << (max_bits - st.cb);
            let sampled_clusters = (units * per_unit).min(total);
            from_sample(&st, copts, vsize, sampled_clusters)
        };
        table.push(r);
    }
    let primary = table
        .iter()
        .find(|r| r.cluster_size == copts.cluster_size())
        .expect("the primary size is in the table")
        .clone();
    Ok(EstimateReport {
        input_format: src.format_name().to_string(),
        virtual_size: vsize,
        cluster_size: primary.cluster_size,
        estimated_size: primary.estimated_size,
        qemu_img_size: primary.qemu_img_size,
        saved_bytes: primary.saved_bytes,
        saved_percent: primary.saved_percent,
        estimated_size_95: primary.estimated_size_95,
        compression: copts.compression.map(|c| c.name().to_string()),
        sample: sampled.as_ref().map(|s| SampleInfo {
            fraction: 1.0 / s.stratum as f64,
            unit: s.unit,
            units_sampled: s.units_sampled(),
            seed: s.seed,
        }),
        table,
        bytes_read,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for EstimateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        writeln!(
            f,
            "input: {} ({}, {:.1} MiB virtual), read {:.1} MiB in {:.2} s",
            self.input_format,
            super::info::human_size(self.virtual_size),
            mib(self.virtual_size),
            mib(self.bytes_read),
            self.seconds
        )?;
        if let Some(s) = &self.sample {
            writeln!(
                f,
                "sampled: {} units of {} ({:.2}% of the input, seed {}); figures are estimates",
                s.units_sampled,
                super::info::human_size(s.unit),
                100.0 * s.fraction,
                s.seed
            )?;
        }
        if let Some(c) = &self.compression {
            writeln!(f, "compression: {c}")?;
        }
        writeln!(
            f,
            "{:>10} {:>14} {:>14} {:>14} {:>8} {:>10} {:>10} {:>10}",
            "cluster", "qdedup", "qemu-img", "saved", "saved%", "unalloc", "stored", "duplicate"
        )?;
        for r in &self.table {
            writeln!(
                f,
                "{:>10} {:>14} {:>14} {:>14} {:>7.1}% {:>10} {:>10} {:>10}",
                super::info::human_size(r.cluster_size),
                r.estimated_size,
                r.qemu_img_size,
                r.saved_bytes,
                r.saved_percent,
                r.clusters_zero,
                r.clusters_unique,
                r.clusters_duplicate
            )?;
            if let Some([lo, hi]) = r.estimated_size_95 {
                writeln!(
                    f,
                    "{:>10} 95% interval of the qdedup size: {lo} .. {hi}",
                    ""
                )?;
            }
        }
        write!(
            f,
            "qdedup would write {:.1} MiB; qemu-img convert {:.1} MiB (saves {:.1}%)",
            mib(self.estimated_size),
            mib(self.qemu_img_size),
            self.saved_percent
        )
    }
}
