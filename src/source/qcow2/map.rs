//! Guest offset → host mapping through L1 and (cached) L2 tables.
//!
//! [`Mapper::extent`] classifies the run of guest bytes starting at an offset into
//! one [`Extent`] and returns its length: consecutive clusters (or subclusters,
//! with extended L2 entries) of the same kind are merged, data only while the host
//! offsets are contiguous, so a read of a large range turns into a few `pread`s.
//! A run never crosses an L2 table (callers loop).
//!
//! The classification follows QEMU's `qcow2_get_subcluster_type` and the checks of
//! `qcow2_get_host_offset`: unaligned L2 tables or data clusters, zero flags in v2
//! images and invalid subcluster bitmaps are corruption; so are L2 tables and data
//! clusters that start past the end of the file (QEMU would read zeros there).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::format::l1l2::{L1Entry, L2Entry, L2Layout, Subcluster, SUBCLUSTERS};
use crate::io::ReadAt;

/// Memory the L2 cache may use.
pub(crate) const L2_CACHE_BYTES: u64 = 32 << 20;
/// Bounds on the number of cached tables (the eviction scan is linear).
const L2_CACHE_MIN_TABLES: u64 = 4;
const L2_CACHE_MAX_TABLES: u64 = 1024;

/// What a run of guest bytes maps to in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Not allocated here: read the backing file (or zeros). `host` is the host
    /// offset of the run's first byte when it lies in an allocated cluster whose
    /// subclusters are not (QEMU's UNALLOCATED_ALLOC; extended L2 only).
    Unallocated { host: Option<u64> },
    /// Reads as zeros (zero cluster or subcluster); never falls through. `host` is
    /// the preallocated host offset of the run's first byte (QEMU's ZERO_ALLOC), if any.
    Zero { host: Option<u64> },
    /// Guest data at this host offset (of the run's first byte); contiguous.
    Data { host: u64 },
    /// One compressed cluster (the run lies inside it).
    Compressed {
        desc: CompressedDescriptor,
        /// File offset of the L2 entry, for error messages.
        entry: u64,
    },
}

/// A small LRU of L2 tables keyed by their file offset.
#[derive(Debug)]
struct L2Cache {
    capacity: usize,
    tick: u64,
    tables: HashMap<u64, (Arc<[u8]>, u64)>,
}

impl L2Cache {
    fn get(&mut self, offset: u64) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            Arc::clone(t)
        })
    }

    fn insert(&mut self, offset: u64, table: Arc<[u8]>) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.tables.remove(&k);
            }
        }
        self.tick += 1;
        self.tables.insert(offset, (table, self.tick));
    }
}

/// The mapping of one qcow2 layer (one L1 table).
#[derive(Debug)]
pub(crate) struct Mapper {
    layout: L2Layout,
    version: u32,
    l1: Vec<u64>,
    l1_offset: u64,
    file_len: u64,
    /// Metadata an L2 table must not overlap: `(start, end, name)`.
    metadata: Vec<(u64, u64, &'static str)>,
    cache: Mutex<L2Cache>,
}

impl Mapper {
    /// `cluster_bits` must be validated (9..=21, ≥ 14 with extended L2).
    pub(crate) fn new(
        cluster_bits: u32,
        extended: bool,
        version: u32,
        l1: Vec<u64>,
        l1_offset: u64,
        file_len: u64,
    ) -> Self {
        let capacity = (L2_CACHE_BYTES >> cluster_bits)
            .clamp(L2_CACHE_MIN_TABLES, L2_CACHE_MAX_TABLES) as usize;
        Mapper {
            layout: L2Layout {
                cluster_bits,
                extended,
                data_file: false,
            },
            version,
            l1,
            l1_offset,
            file_len,
            metadata: Vec::new(),
            cache: Mutex::new(L2Cache {
                capacity,
                tick: 0,
                tables: HashMap::new(),
            }),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.layout.cluster_bits
    }

    /// Data clusters live in an external data file: host offset 0 with
    /// `QCOW_OFLAG_COPIED` is data, data offsets are not bounded by this file's
    /// length (the data file reads as zeros past its end, as in QEMU), and
    /// compressed clusters are corruption (QEMU refuses them too).
    pub(crate) fn set_data_file(&mut self) {
        self.layout.data_file = true;
    }

    /// Records metadata ranges (header, L1 and refcount tables) that no L2 table may
    /// overlap: an L1 entry pointing there would make us read metadata as guest
    /// data pointers (iotest 060's "L2 table at the L1 table / header" recipes).
    pub(crate) fn set_metadata(&mut self, ranges: Vec<(u64, u64, &'static str)>) {
        self.metadata = ranges;
    }

    /// Loads (or finds in the cache) the L2 table at `l2_off`, referenced by L1
    /// entry `l1_index`.
    fn l2_table(&self, file: &dyn ReadAt, l2_off: u64, l1_index: u64) -> Result<Arc<[u8]>> {
        if let Some(t) = self.cache.lock().expect("L2 cache lock").get(l2_off) {
            return Ok(t);
        }
        let cs = self.cluster_size();
        let l1_entry = self.l1_offset + l1_index * 8;
        if l2_off & (cs - 1) != 0 {
            return Err(Error::corrupt(
                "L1 table",
                l1_entry,
                format!("L1 entry {l1_index}: L2 table offset {l2_off:#x} is not cluster aligned"),
            ));
        }
        if l2_off + cs > self.file_len {
            return Err(Error::corrupt(
                "L1 table",
                l1_entry,
                format!(
                    "L1 entry {l1_index}: L2 table at {l2_off:#x} extends past the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        if let Some((_, _, what)) = self
            .metadata
            .iter()
            .find(|(start, end, _)| l2_off < *end && *start < l2_off + cs)
        {
            return Err(Error::corrupt(
                "L1 table",
                l1_entry,
                format!("L1 entry {l1_index}: L2 table at {l2_off:#x} overlaps the {what}"),
            ));
        }
        // cs ≤ 2 MiB (validated cluster_bits).
        let mut raw = vec![0u8; cs as usize];
        file.read_exact_at(&mut raw, l2_off)
            .map_err(|e| Error::io(format!("cannot read the L2 table at {l2_off:#x}"), e))?;
        let table: Arc<[u8]> = raw.into();
        self.cache
            .lock()
            .expect("L2 cache lock")
            .insert(l2_off, Arc::clone(&table));
        Ok(table)
    }

    /// Classifies guest bytes `[guest, guest + max_len)` from their start: returns
    /// the kind of the first run and its length (1..=max_len; `max_len` ≥ 1).
    pub(crate) fn extent(
        &self,
        file: &dyn ReadAt,
        guest: u64,
        max_len: u64,
    ) -> Result<(Extent, u64)> {
        let cb = self.layout.cluster_bits;
        let l2_entries = self.layout.entries_per_table();
        let l2_span = self.layout.table_span();
        let l1_index = guest / l2_span;
        let span_end = (l1_index + 1).saturating_mul(l2_span);
        let end = guest.saturating_add(max_len).min(span_end);
        let Some(&l1_raw) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            // Past the L1 table (a snapshot's shorter table): unallocated, as in QEMU.
            return Ok((Extent::Unallocated { host: None }, end - guest));
        };
        let l2_off = L1Entry::decode(l1_raw).l2_offset;
        if l2_off == 0 {
            return Ok((Extent::Unallocated { host: None }, end - guest));
        }
        let table = self.l2_table(file, l2_off, l1_index)?;

        let mut pos = guest;
        let mut first: Option<Extent> = None;
        while pos < end {
            let ci = (pos >> cb) & (l2_entries - 1);
            let (kind, unit_end) = self.classify(&table, l2_off, ci, pos)?;
            let next = unit_end.min(end);
            match first {
                None => first = Some(kind),
                Some(Extent::Unallocated { host: None })
                    if kind == (Extent::Unallocated { host: None }) => {}
                Some(Extent::Unallocated { host: Some(h) })
                    if kind
                        == (Extent::Unallocated {
                            host: Some(h + (pos - guest)),
                        }) => {}
                Some(Extent::Zero { host: None }) if kind == (Extent::Zero { host: None }) => {}
                Some(Extent::Zero { host: Some(h) })
                    if kind
                        == (Extent::Zero {
                            host: Some(h + (pos - guest)),
                        }) => {}
                Some(Extent::Data { host })
                    if kind
                        == (Extent::Data {
                            host: host + (pos - guest),
                        }) => {}
                Some(_) => break,
            }
            pos = next;
            if matches!(first, Some(Extent::Compressed { .. })) {
                break;
            }
        }
        Ok((first.expect("guest < end, so the loop ran"), pos - guest))
    }

    /// Classifies the unit (cluster or subcluster) holding `pos`; returns its kind
    /// (for data, the host offset of `pos` itself) and the guest end of the unit.
    fn classify(&self, table: &[u8], l2_off: u64, ci: u64, pos: u64) -> Result<(Extent, u64)> {
        let lay = self.layout;
        let cb = lay.cluster_bits;
        let cs = self.cluster_size();
        // ci < entries_per_table and the table is one whole cluster.
        let slot = lay.slot(table, ci).expect("entry inside the table");
        let entry = l2_off + ci * lay.entry_bytes();
        let cluster_end = ((pos >> cb) + 1) << cb;
        let unit_bits = lay.unit_bits();
        let unit_end = ((pos >> unit_bits) + 1) << unit_bits;
        let in_cluster = pos & (cs - 1);
        let corrupt = |detail: String| Error::corrupt("L2 entry", entry, detail);

        let e = lay.decode(slot.raw);
        if let (L2Entry::Compressed { .. }, true) = (e, lay.data_file) {
            return Err(corrupt(
                "compressed cluster in an image with an external data file".to_string(),
            ));
        }
        if let L2Entry::Compressed { desc, .. } = e {
            // The subcluster bitmap of a compressed entry is ignored on reads (QEMU).
            return Ok((Extent::Compressed { desc, entry }, cluster_end));
        }
        if matches!(e, L2Entry::ZeroPlain | L2Entry::ZeroAlloc { .. }) && self.version < 3 {
            return Err(corrupt(
                "zero cluster entry in a version 2 image".to_string(),
            ));
        }
        if let Some(host) = e.host_offset() {
            if host & (cs - 1) != 0 {
                return Err(corrupt(format!(
                    "cluster offset {host:#x} is not cluster aligned"
                )));
            }
        }
        let unit = ((pos >> unit_bits) & u64::from(SUBCLUSTERS - 1)) as u32;
        let kind = match e.subcluster(lay.extended.then_some(slot.bitmap), unit) {
            Err(invalid) => {
                return Err(corrupt(format!(
                    "{invalid} (bitmap {:#018x})",
                    slot.bitmap.0
                )))
            }
            Ok(Subcluster::Data { host }) => {
                if host >= self.file_len && !lay.data_file {
                    return Err(corrupt(format!(
                        "data cluster at file offset {host:#x} lies past the end of the file ({} bytes)",
                        self.file_len
                    )));
                }
                Extent::Data {
                    host: host + in_cluster,
                }
            }
            Ok(Subcluster::Zero { host }) => Extent::Zero {
                host: host.map(|h| h + in_cluster),
            },
            Ok(Subcluster::Unallocated { host }) => Extent::Unallocated {
                host: host.map(|h| h + in_cluster),
            },
            Ok(Subcluster::Compressed(desc)) => Extent::Compressed { desc, entry },
        };
        Ok((kind, if lay.extended { unit_end } else { cluster_end }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFile;

    #[test]
    fn l2_cache_evicts_the_least_recently_used_table() {
        let mut c = L2Cache {
            capacity: 2,
            tick: 0,
            tables: HashMap::new(),
        };
        let t = |v: u8| -> Arc<[u8]> { vec![v].into() };
        c.insert(1, t(1));
        c.insert(2, t(2));
        assert!(c.get(1).is_some()); // 2 is now the oldest
        c.insert(3, t(3));
        assert!(c.get(2).is_none());
        assert_eq!(c.get(1).unwrap()[0], 1);
        assert_eq!(c.get(3).unwrap()[0], 3);
        assert_eq!(c.tables.len(), 2);
    }

    /// A 4 KiB-cluster layer: L2 table at 0x1000, data clusters from 0x2000.
    fn layer(entries: &[u64]) -> (Mapper, MemFile) {
        let mut file = vec![0u8; 0x8000];
        for (i, e) in entries.iter().enumerate() {
            file[0x1000 + i * 8..0x1000 + i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let m = Mapper::new(12, false, 3, vec![0x1000], 0x100, 0x8000);
        (m, MemFile::new(file))
    }

    #[test]
    fn runs_merge_while_host_clusters_are_contiguous() {
        let (m, f) = layer(&[0x2000, 0x3000, 0x5000, 0, 0, 1, 1, 0x4000 | (1 << 62)]);
        assert_eq!(
            m.extent(&f, 100, 1 << 20).unwrap(),
            (Extent::Data { host: 0x2064 }, 0x2000 - 100)
        );
        assert_eq!(
            m.extent(&f, 0x2000, 1 << 20).unwrap(),
            (Extent::Data { host: 0x5000 }, 0x1000)
        );
        assert_eq!(
            m.extent(&f, 0x3000, 1 << 20).unwrap(),
            (Extent::Unallocated { host: None }, 0x2000)
        );
        assert_eq!(
            m.extent(&f, 0x5000, 0x1800).unwrap(),
            (Extent::Zero { host: None }, 0x1800)
        );
        assert!(matches!(
            m.extent(&f, 0x7800, 1 << 20).unwrap(),
            (Extent::Compressed { .. }, 0x800)
        ));
        // The rest of the table and past the L1 table: unallocated.
        assert_eq!(
            m.extent(&f, 0x8000, 1 << 30).unwrap(),
            (Extent::Unallocated { host: None }, (512 << 12) - 0x8000)
        );
        assert_eq!(
            m.extent(&f, 512 << 12, 5).unwrap(),
            (Extent::Unallocated { host: None }, 5)
        );
    }

    #[test]
    fn data_past_the_end_of_the_file_names_the_l2_entry() {
        let (m, f) = layer(&[0x2000, 0x9000]);
        let e = m.extent(&f, 0x1000, 0x1000).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Corrupt {
                    structure: "L2 entry",
                    offset: 0x1008,
                    ..
                }
            ),
            "{e}"
        );
        let (m, f) = layer(&[0x2200]);
        assert!(matches!(
            m.extent(&f, 0, 1),
            Err(Error::Corrupt {
                structure: "L2 entry",
                offset: 0x1000,
                ..
            })
        ));
    }
}
