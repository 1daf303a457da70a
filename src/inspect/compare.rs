//! `compare`: guest-visible equality of two images, like `qemu-img compare`.
//!
//! Runs both images report as zero are skipped without reading; a run one image
//! reports as zero is checked by reading the other image only. When both top
//! layers are qcow2 files with the same cluster size, data clusters are compared
//! one at a time, and a guest cluster that a top layer serves wholly from its own
//! file is identified by what decides its bytes (a `ClusterSource`): one plain
//! host cluster with every subcluster allocated, or one compressed stream (start
//! and length). A pair of such sources already found equal (deduplicated images
//! repeat pairs), or the same plain host cluster of the same file, is not read
//! again. Clusters that are partly allocated, zero or fall through to a backing
//! file are always read: their bytes depend on more than the host cluster.
//! Images of different sizes compare like qemu-img: the common part must be equal
//! and the longer image must read as zeros past it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::dedup::is_zero;
use crate::error::{IoContext, Result};
use crate::source::chain::{link, open_layers, Layer, LayerKind};
use crate::source::qcow2::LayerExtent;
use crate::source::{BlockStatus, Format, OpenOptions};

/// Bytes compared per step.
const CHUNK: u64 = 1 << 20;
/// qemu-img reports the 512-byte sector where contents first differ.
const SECTOR: u64 = 512;

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompareReport {
    /// The virtual sizes differ.
    pub size_mismatch: bool,
    /// The smaller of the two virtual sizes.
    pub common_size: u64,
    /// Offset of the first differing 512-byte sector, if any.
    pub mismatch_offset: Option<u64>,
    /// Guest bytes read from either image.
    pub bytes_read: u64,
    /// Clusters not read because both images serve them wholly from host data
    /// (plain clusters or compressed streams) already compared, or from the same
    /// plain host cluster of the same file.
    pub clusters_skipped_shared: u64,
}

/// Formats of the two images (probed when `None`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CompareOptions {
    /// Format of the first image.
    pub format_a: Option<Format>,
    /// Format of the second image.
    pub format_b: Option<Format>,
    /// Read images another process has open for writing (qemu-img's `-U`):
    /// see [`OpenOptions::force_share`](crate::source::OpenOptions::force_share).
    pub force_share: bool,
}

/// Opens the image at `p` with its backing chain: the top layer, reading through
/// the layers below.
fn open_top(p: &Path, f: Option<Format>, force_share: bool) -> Result<Layer> {
    let opts = OpenOptions {
        format: f,
        force_share,
        ..OpenOptions::default()
    };
    Ok(link(open_layers(p, &opts)?))
}

/// Cluster size and file identity of a qcow2 top layer, for the host-pair cache.
struct Top<'a> {
    layer: &'a Layer,
    cluster_size: u64,
    file_id: (u64, u64),
}

/// Everything that decides the bytes of one whole guest cluster that a qcow2
/// layer serves from its own file, without its backing file: within one file (of
/// fixed cluster size and compression type) equal sources read as equal bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClusterSource {
    /// The plain host cluster at this offset, every subcluster allocated.
    Plain(u64),
    /// The compressed stream at `host`, `len` bytes read (the full descriptor:
    /// a shorter count can turn the same start into a stream that fails).
    Compressed { host: u64, len: u64 },
}

impl Top<'_> {
    /// What serves the guest cluster at `off` (cluster aligned, inside the image),
    /// when it comes wholly from this file: `None` for clusters that are partly
    /// allocated, zero, or fall through to the backing file.
    fn cluster_source(&self, off: u64) -> Result<Option<ClusterSource>> {
        let cs = self.cluster_size;
        let (e, len) = self.layer.extent(off, cs)?;
        Ok(match e {
            // A data run is contiguous on the host: a full-cluster run is one host
            // cluster with every subcluster allocated.
            LayerExtent::Data { host } if len == cs => Some(ClusterSource::Plain(host)),
            LayerExtent::Compressed { host, len } => Some(ClusterSource::Compressed { host, len }),
            _ => None,
        })
    }
}

fn top<'a>(p: &Path, layer: &'a Layer) -> Result<Option<Top<'a>>> {
    let LayerKind::Qcow2(q) = &layer.kind else {
        return Ok(None);
    };
    let cluster_size = q.header().cluster_size();
    let m = std::fs::metadata(p).ctx(|| format!("cannot stat {}", p.display()))?;
    Ok(Some(Top {
        layer,
        cluster_size,
        file_id: (m.dev(), m.ino()),
    }))
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    if is_zero(buf) {
        None
    } else {
        buf.iter().position(|b| *b != 0)
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        None
    } else {
        a.iter().zip(b).position(|(x, y)| x != y)
    }
}

/// Compares the guest contents of the images at `a` and `b`.
pub fn compare(a: &Path, b: &Path, opts: &CompareOptions) -> Result<CompareReport> {
    let la = open_top(a, opts.format_a, opts.force_share)?;
    let lb = open_top(b, opts.format_b, opts.force_share)?;
    let (sa, sb) = (la.source(), lb.source());
    let (ta, tb) = (top(a, &la)?, top(b, &lb)?);
    let tops = match (ta, tb) {
        (Some(x), Some(y)) if x.cluster_size == y.cluster_size => Some((x, y)),
        _ => None,
    };
    let (size_a, size_b) = (sa.virtual_size(), sb.virtual_size());
    let common = size_a.min(size_b);
    let mut r = CompareReport {
        size_mismatch: size_a != size_b,
        common_size: common,
        mismatch_offset: None,
        bytes_read: 0,
        clusters_skipped_shared: 0,
    };
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut equal_pairs: HashSet<(ClusterSource, ClusterSource)> = HashSet::new();
    let mut off = 0u64;
    while off < common {
        let (st_a, len_a) = sa.block_status(off, common - off)?;
        let (st_b, len_b) = sb.block_status(off, common - off)?;
        let mut n = len_a.min(len_b).min(CHUNK);
        if st_a == BlockStatus::Zero && st_b == BlockStatus::Zero {
            off += len_a.min(len_b);
            continue;
        }
        // What serves the cluster at `off` in both top layers, when both serve it
        // wholly from their own file.
        let mut pair = None;
        if let (Some((x, y)), BlockStatus::Data, BlockStatus::Data) = (&tops, st_a, st_b) {
            let cs = x.cluster_size;
            n = n.min(cs - (off & (cs - 1)));
            if off & (cs - 1) == 0 && n == cs {
                if let (Some(ka), Some(kb)) = (x.cluster_source(off)?, y.cluster_source(off)?) {
                    // The same plain cluster of the same file reads the same bytes;
                    // a compressed stream is read once (it may fail to decompress).
                    let same = x.file_id == y.file_id && ka == kb;
                    if (same && matches!(ka, ClusterSource::Plain(_)))
                        || equal_pairs.contains(&(ka, kb))
                    {
                        r.clusters_skipped_shared += 1;
                        off += n;
                        continue;
                    }
                    pair = Some((ka, kb));
                }
            }
        }
        let len = n as usize;
        let diff = match (st_a, st_b) {
            (BlockStatus::Zero, _) => {
                sb.read_at(&mut bb[..len], off)?;
                r.bytes_read += n;
                first_nonzero(&bb[..len])
            }
            (_, BlockStatus::Zero) => {
                sa.read_at(&mut ba[..len], off)?;
                r.bytes_read += n;
                first_nonzero(&ba[..len])
            }
            _ => {
                sa.read_at(&mut ba[..len], off)?;
                sb.read_at(&mut bb[..len], off)?;
                r.bytes_read += 2 * n;
                first_diff(&ba[..len], &bb[..len])
            }
        };
        if let Some(i) = diff {
            r.mismatch_offset = Some((off + i as u64) / SECTOR * SECTOR);
            return Ok(r);
        }
        if let Some(p) = pair {
            equal_pairs.insert(p);
        }
        off += n;
    }
    // The tail of the longer image must read as zeros.
    let longer = if size_a > size_b { sa } else { sb };
    let end = longer.virtual_size();
    while off < end {
        let (st, len) = longer.block_status(off, end - off)?;
        let n = len.min(CHUNK);
        if st == BlockStatus::Data {
            longer.read_at(&mut ba[..n as usize], off)?;
            r.bytes_read += n;
            if let Some(i) = first_nonzero(&ba[..n as usize]) {
                r.mismatch_offset = Some((off + i as u64) / SECTOR * SECTOR);
                return Ok(r);
            }
            off += n;
        } else {
            off += len;
        }
    }
    Ok(r)
}
