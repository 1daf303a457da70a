//! `map`: the guest → host mapping as `qemu-img map` reports it.
//!
//! Each extent is what QEMU's `get_block_status` in `qemu-img.c` computes: the
//! first layer of the chain (depth 0 = the image itself) that allocates the
//! bytes answers; a run unallocated everywhere reads as zeros and is reported at
//! the depth of the last layer consulted with `present: false`. Consecutive
//! extents merge like `entry_mergeable`: same flags and depth, and host offsets
//! contiguous when there are offsets. With `shared`, each extent also carries the
//! stored refcount of its host cluster, and extents are split where it changes.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::refcounts::{Refcounts, Stored};
use crate::source::chain::{open_layers, Layer, LayerKind};
use crate::source::qcow2::{LayerExtent, Qcow2Source};
use crate::source::raw::RawSource;
use crate::source::{BlockStatus, Format, OpenOptions, Source};

/// One extent, with `qemu-img map --output=json`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer answering (0 = the image itself, 1 = its backing file, ...).
    pub depth: u32,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data (or a preallocated cluster).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file of layer `depth` (absent for unallocated, plain
    /// zero and compressed extents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// With `--shared`: the stored refcount of the host cluster (for compressed
    /// extents, of the cluster where the stream starts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount: Option<u64>,
}

/// Options of [`map`].
#[derive(Debug, Clone, Default)]
pub struct MapOptions {
    /// Force the format of the image (probed when `None`).
    pub format: Option<Format>,
    /// Report refcounts and do not merge extents with different refcounts.
    pub shared: bool,
    /// Read an image another process has open for writing (qemu-img's `-U`):
    /// see [`OpenOptions::force_share`](crate::source::OpenOptions::force_share).
    pub force_share: bool,
}

/// A mapped image: its extents and the names of its layers (by depth).
#[derive(Debug, Clone)]
pub struct MapReport {
    /// Extents covering the virtual size, in guest order. A 0-byte image has one
    /// 0-length entry with every flag false, as `qemu-img map` prints it.
    pub entries: Vec<MapEntry>,
    /// File name of each layer (top first), as QEMU prints them.
    pub files: Vec<String>,
    /// Cluster size of the top layer (qcow2), for rendering.
    pub cluster_size: Option<u64>,
}

/// The stored refcount of the host cluster holding byte `host` of the qcow2 layer
/// `q`. Blocks past the end of the file read as zeros, as in QEMU; a table entry
/// that points at an unaligned block is an error, as QEMU's `qcow2_get_refcount`
/// makes it.
fn stored_refcount(q: &Qcow2Source, rc: &mut Refcounts, host: u64) -> Result<u64> {
    let h = q.header();
    let cluster = host >> h.cluster_bits;
    match rc.get(q.file(), cluster)? {
        Stored::Count(n) => Ok(n),
        Stored::Unreadable { block } => Err(Error::corrupt(
            "refcount table",
            h.refcount_table_offset + 8 * (cluster >> rc.entries_per_block_bits()),
            format!("refcount block offset {block:#x} is not cluster aligned"),
        )),
    }
}

/// `get_block_status` of qemu-img: one extent starting at `offset`.
fn block_status(
    layers: &[Layer],
    readers: &mut [Option<Refcounts>],
    files: &[Option<RawSource>],
    offset: u64,
    mut bytes: u64,
) -> Result<MapEntry> {
    let mut depth = 0usize;
    loop {
        let layer = &layers[depth];
        let (ext, len) = layer.extent(offset, bytes)?;
        bytes = len;
        let mut e = MapEntry {
            start: offset,
            length: bytes,
            depth: depth as u32,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            refcount: None,
        };
        let rc_host = match ext {
            LayerExtent::Unallocated { host } => {
                if let Some(next) = layers.get(depth + 1) {
                    if offset < next.size() {
                        depth += 1;
                        continue;
                    }
                }
                e.present = false;
                e.zero = true;
                // QEMU reports the offset of unallocated subclusters of an
                // allocated cluster (OFFSET_VALID without DATA).
                e.offset = host;
                None
            }
            LayerExtent::Zero { host } => {
                e.zero = true;
                e.offset = host;
                host
            }
            LayerExtent::Data { host } => {
                e.data = true;
                e.offset = Some(host);
                if let Some(file) = &files[depth] {
                    // QEMU's BDRV_BLOCK_RECURSE: a hole in the file under a data
                    // cluster reads as zeros (errors only lose the extra detail).
                    match file.block_status(host, e.length) {
                        Ok((st, n)) if n > 0 => {
                            e.length = n.min(e.length);
                            e.zero = st == BlockStatus::Zero;
                        }
                        Ok(_) => e.zero = true, // past the end of the file
                        Err(_) => {}
                    }
                }
                Some(host)
            }
            LayerExtent::Compressed { host, .. } => {
                e.data = true;
                e.compressed = true;
                Some(host)
            }
        };
        // Refcount readers exist for qcow2 layers only.
        if let (Some(h), Some(rr), LayerKind::Qcow2(q)) =
            (rc_host, &mut readers[depth], &layers[depth].kind)
        {
            let rc = stored_refcount(q, rr, h)?;
            e.refcount = Some(rc);
            // Shorten a plain run to the clusters sharing the first one's refcount.
            if e.offset.is_some() {
                let cs = q.header().cluster_size();
                let mut n = (cs - (h & (cs - 1))).min(e.length);
                while n < e.length && stored_refcount(q, rr, h + n)? == rc {
                    n = (n + cs).min(e.length);
                }
                e.length = n;
            }
        }
        return Ok(e);
    }
}

/// `entry_mergeable` of qemu-img (plus equal refcounts).
fn mergeable(a: &MapEntry, b: &MapEntry) -> bool {
    if a.length == 0
        || (a.zero, a.data, a.compressed, a.depth, a.present, a.refcount)
            != (b.zero, b.data, b.compressed, b.depth, b.present, b.refcount)
    {
        return false;
    }
    match (a.offset, b.offset) {
        (None, None) => true,
        (Some(x), Some(y)) => x + a.length == y,
        _ => false,
    }
}

/// QEMU's `qcow2_detect_metadata_preallocation`: clusters with a refcount outnumber
/// the file's allocated blocks by more than a ninth (and two). Then QEMU asks the
/// file system which parts of data clusters are holes, and reports those as zero.
/// Errors give false, as in QEMU.
fn metadata_preallocated(path: &Path, q: &Qcow2Source) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let cs = q.header().cluster_size();
    let real_clusters = meta.blocks().saturating_mul(512) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let Ok(mut rc) = Refcounts::load(q.file(), q.header()) else {
        return false;
    };
    let mut count = 0u64;
    let mut i = 0u64;
    while i < meta.len().div_ceil(cs) && count < threshold {
        match rc.get(q.file(), i) {
            Ok(Stored::Count(0)) => {}
            Ok(Stored::Count(_)) => count += 1,
            Ok(Stored::Unreadable { .. }) | Err(_) => return false,
        }
        i += 1;
    }
    count >= threshold
}

/// Maps the image at `path` through its backing chain.
pub fn map(path: &Path, opts: &MapOptions) -> Result<MapReport> {
    let layers = open_layers(
        path,
        &OpenOptions {
            format: opts.format,
            force_share: opts.force_share,
            ..OpenOptions::default()
        },
    )?;
    let mut readers = layers
        .iter()
        .map(|l| match &l.kind {
            LayerKind::Qcow2(q) if opts.shared => Refcounts::load(q.file(), q.header()).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let files = layers
        .iter()
        .map(|l| match &l.kind {
            LayerKind::Qcow2(q) if metadata_preallocated(&l.name, q) => {
                RawSource::open(&l.name).map(Some)
            }
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let size = layers[0].size();
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut off = 0;
    while off < size {
        let e = block_status(&layers, &mut readers, &files, off, size - off)?;
        off += e.length;
        match entries.last_mut() {
            Some(c) if mergeable(c, &e) => c.length += e.length,
            _ => entries.push(e),
        }
    }
    if entries.is_empty() {
        // A 0-byte image: qemu-img's img_map prints its initial, empty entry.
        entries.push(MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            refcount: None,
        });
    }
    let cluster_size = match &layers[0].kind {
        LayerKind::Qcow2(q) => Some(q.header().cluster_size()),
        LayerKind::Raw(_) => None,
    };
    Ok(MapReport {
        entries,
        files: layers
            .iter()
            .map(|l| l.name.display().to_string())
            .collect(),
        cluster_size,
    })
}

/// The JSON text qemu-img prints: one entry per line.
pub fn to_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        if let Some(r) = e.refcount {
            let _ = write!(s, ", \"refcount\": {r}");
        }
        s.push('}');
    }
    s.push(']');
    s
}

/// C's `%#x`: `0` has no prefix.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// qemu-img map's default table: data extents only. Compressed extents (which
/// qemu-img refuses to print) show "compressed" instead of a host offset.
///
/// The columns are qemu-img's (`%#-16x` three times, then the file name), so the
/// table is byte for byte qemu-img's while every number fits in 15 characters;
/// a wider number widens its column (one space at least between columns), and
/// with `shared` the file column is padded to the longest name so that the
/// right-aligned `Refcount` column lines up whatever the names.
pub fn to_human(m: &MapReport, shared: bool) -> String {
    let header = ["Offset", "Length", "Mapped to", "File", "Refcount"];
    let rows: Vec<[String; 5]> = m
        .entries
        .iter()
        .filter(|e| e.data && !e.zero)
        .map(|e| {
            [
                hex(e.start),
                hex(e.length),
                e.offset.map_or_else(|| "compressed".to_string(), hex),
                m.files.get(e.depth as usize).cloned().unwrap_or_default(),
                e.refcount.map(|r| r.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    let width = |col: usize| {
        rows.iter()
            .map(|r| r[col].len())
            .chain([header[col].len()])
            .max()
            .unwrap_or(0)
    };
    // qemu-img's 16 (`%-16`), or more where a cell needs it.
    let num_widths = [0, 1, 2].map(|c| (width(c) + 1).max(16));
    let file_width = width(3);
    let rc_width = width(4);
    let line = |cells: [&str; 5]| {
        let mut l = String::new();
        for (c, w) in cells[..3].iter().zip(num_widths) {
            let _ = write!(l, "{c:<w$}");
        }
        if shared {
            let _ = write!(l, "{:<file_width$}  {:>rc_width$}", cells[3], cells[4]);
        } else {
            l.push_str(cells[3]);
        }
        l.push('\n');
        l
    };
    let mut s = line(header);
    for r in &rows {
        s.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
    }
    s
}
