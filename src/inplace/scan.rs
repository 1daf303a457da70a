//! The scan: which L2 entries of the active tree `dedup` may change, and the
//! references and stored refcount of every host cluster they point to.
//!
//! An entry may change when its L2 table is written by nobody else: the table is
//! reached from the active L1 table once (first visit) and its stored refcount
//! is one. Tables with a higher refcount are shared with an internal snapshot (QEMU
//! copies such a table before it writes it); `dedup` skips them, leaving their
//! entries as they are (their clusters still count as references). Only plain
//! data entries are candidates: compressed entries, preallocated zero entries and,
//! with extended L2 entries, clusters not wholly allocated are left alone.

use crate::error::Result;
use crate::format::l1l2::L2Entry;
use crate::image::refcounts::{Refcounts, Stored};
use crate::image::tables::{L2Ref, L2Table, PastEof, Tables, Tree, Visitor, Walker};
use crate::image::Image;
use crate::io::ReadAt;

/// One changeable L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ref {
    /// Host cluster index the entry points to.
    pub(crate) host: u64,
    /// File offset of the entry's descriptor word.
    pub(crate) at: u64,
}

/// One host cluster that changeable entries point to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Host {
    /// Host cluster index.
    pub(crate) cluster: u64,
    /// Its entries: `Scan::refs[first..first + n]`.
    pub(crate) first: usize,
    /// Number of changeable entries pointing to it.
    pub(crate) n: u64,
    /// Its stored refcount.
    pub(crate) rc: u64,
}

impl Host {
    /// Whether every reference to the cluster is a changeable entry: only then
    /// can the cluster be freed (or moved) by changing those entries.
    pub(crate) fn removable(&self) -> bool {
        self.rc == self.n
    }
}

/// One L2 table of the active tree that `dedup` may write (and move).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct L2Info {
    /// File offset of the table.
    pub(crate) offset: u64,
    /// File offset of the L1 entry pointing to it.
    pub(crate) l1_at: u64,
    /// That L1 entry as stored.
    pub(crate) l1_raw: u64,
}

/// What the scan found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Changeable entries, sorted by host cluster.
    pub(crate) refs: Vec<Ref>,
    /// Distinct host clusters of `refs`, ascending.
    pub(crate) hosts: Vec<Host>,
    /// The L2 tables whose entries may change.
    pub(crate) l2_tables: Vec<L2Info>,
    /// Active L2 tables skipped because a snapshot shares them (refcount > 1).
    pub(crate) shared_l2_tables: u64,
    /// Compressed entries left as they are.
    pub(crate) compressed_entries: u64,
    /// Extended L2 entries whose cluster is not wholly allocated data.
    pub(crate) partial_entries: u64,
    /// Preallocated zero entries left as they are.
    pub(crate) zero_alloc_entries: u64,
}

impl Scan {
    /// The entries pointing to `h`.
    pub(crate) fn refs_of(&self, h: &Host) -> &[Ref] {
        // first + n ≤ refs.len() by construction.
        &self.refs[h.first..h.first + h.n as usize]
    }
}

struct Collect<'a, F: ReadAt + ?Sized> {
    file: &'a F,
    refcounts: &'a mut Refcounts,
    cluster_bits: u32,
    extended: bool,
    writable: bool,
    scan: Scan,
}

impl<F: ReadAt + ?Sized> Visitor for Collect<'_, F> {
    fn l2_table(&mut self, t: &L2Table) -> Result<()> {
        let rc = self
            .refcounts
            .get(self.file, t.offset >> self.cluster_bits)?;
        self.writable = t.first_visit && rc == Stored::Count(1);
        if !self.writable && t.first_visit {
            self.scan.shared_l2_tables += 1;
        }
        if self.writable {
            self.scan.l2_tables.push(L2Info {
                offset: t.offset,
                l1_at: t.l1.at,
                l1_raw: t.l1.raw,
            });
        }
        Ok(())
    }

    fn l2_entry(&mut self, _t: &L2Table, e: &L2Ref) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        match e.entry {
            L2Entry::Normal { offset, .. } if offset != 0 => {
                // Extended entries must be wholly allocated, no subcluster
                // reading as zero or from the backing file.
                let b = e.slot.bitmap;
                if self.extended && (b.allocation() != u32::MAX || b.zeros() != 0) {
                    self.scan.partial_entries += 1;
                } else {
                    self.scan.refs.push(Ref {
                        host: offset >> self.cluster_bits,
                        at: e.at,
                    });
                }
            }
            L2Entry::Compressed { .. } => self.scan.compressed_entries += 1,
            L2Entry::ZeroAlloc { .. } => self.scan.zero_alloc_entries += 1,
            _ => {}
        }
        Ok(())
    }
}

/// Scans the active tree of `im` (see the module doc).
pub(crate) fn scan<F: ReadAt + ?Sized>(
    file: &F,
    im: &Image,
    refcounts: &mut Refcounts,
) -> Result<Scan> {
    let mut c = Collect {
        file,
        refcounts,
        cluster_bits: im.cluster_bits,
        extended: im.extended_l2,
        writable: false,
        scan: Scan::default(),
    };
    let mut w = Walker::new(Tables::new(file, im, PastEof::Corrupt))?;
    w.walk(&[Tree::active(&im.header)], &mut c)?;
    let mut scan = c.scan;
    scan.refs.sort_unstable_by_key(|r| (r.host, r.at));
    let mut i = 0;
    while i < scan.refs.len() {
        let host = scan.refs[i].host;
        let n = scan.refs[i..].iter().take_while(|r| r.host == host).count();
        let rc = match c.refcounts.get(file, host)? {
            Stored::Count(rc) => rc,
            // Not reached on an image `check` found clean; never freed if it is.
            Stored::Unreadable { .. } => u64::MAX,
        };
        scan.hosts.push(Host {
            cluster: host,
            first: i,
            n: n as u64,
            rc,
        });
        i += n;
    }
    Ok(scan)
}
