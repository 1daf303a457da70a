//! Opening one qcow2 layer: header, features, extensions, backing file name and
//! format, and the L1 table of the active layer or of a snapshot.
//!
//! The header and cluster 0 are opened by the shared opener ([`Image::open`], QEMU's
//! checks); what is left here is the reader's policy: refuse what cannot be read
//! (encryption, unnamed data files, the corrupt bit), and bound the L1 table it reads by
//! the file size.

use crate::error::{Error, Result};
use crate::format::header::{Header, MAX_L1_BYTES};
use crate::format::snapshot::Snapshot;
use crate::image::{Image, OpenMode};
use crate::io::ReadAt;

/// Everything read at open time from one qcow2 file.
#[derive(Debug)]
pub(crate) struct Meta {
    pub header: Header,
    pub file_len: u64,
    /// Guest size: the header's size floored to 512 bytes, as QEMU does
    /// (`total_sectors = size / 512`); also for a snapshot's view.
    pub virtual_size: u64,
    /// Raw L1 entries of the view being read.
    pub l1: Vec<u64>,
    /// File offset of that L1 table.
    pub l1_offset: u64,
    /// Backing file name bytes as stored (None if there is no backing file).
    pub backing_name: Option<Vec<u8>>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// The snapshot whose view is read, if one was asked for.
    pub snapshot: Option<Snapshot>,
    /// The image's snapshot table (read at open, as QEMU does).
    pub snapshots: Vec<Snapshot>,
    /// The external data file's name as stored, for an image with one
    /// (incompatible bit 2).
    pub data_file_name: Option<String>,
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("cannot read the qcow2 {what}"), e)
}

/// Opens `file` with the shared opener (QEMU's checks), refuses what reading guest
/// data cannot accept (every [`crate::image::Caveat`]), then loads the L1 table of
/// the active layer, or of `snapshot` (matched by ID first, then by name, like
/// `qemu-img convert -l`).
pub(crate) fn read_meta(file: &dyn ReadAt, snapshot: Option<&str>) -> Result<Meta> {
    let im = Image::open(file, OpenMode::Read)?;
    im.refuse_caveats()?;
    // The reader's own rule on the table it reads: the active L1 table inside the
    // file, not over the header.
    im.header.validate_l1_in_file(im.file_len)?;
    // Dirty images (bit 0) are accepted: see docs/qcow2-input.md.
    let (header, file_len) = (&im.header, im.file_len);
    // A snapshot's view keeps the image's current size, as `qemu-img convert -l`
    // does (`qcow2_snapshot_load_tmp` switches the L1 table only): the image may
    // have been resized since, and L1 entries past the snapshot's table read as
    // unallocated (the backing file shows through).
    let (l1_offset, l1_size, snap) = match snapshot {
        None => (header.l1_table_offset, header.l1_size, None),
        Some(want) => {
            let snap = find_snapshot(&im.snapshots, want)?;
            check_snapshot_l1(header, &snap, file_len)?;
            (snap.l1_table_offset, snap.l1_size, Some(snap))
        }
    };
    // l1_size is bounded (validate / check_snapshot_l1) to 32 MiB inside the file.
    let mut raw = vec![0u8; l1_size as usize * 8];
    if !raw.is_empty() {
        file.read_exact_at(&mut raw, l1_offset)
            .map_err(io_err("L1 table"))?;
    }
    let l1 = crate::format::be64_words(&raw).collect();
    let backing_name = im.backing_file().map(<[u8]>::to_vec);
    let data_file_name = im.data_file_name.clone().filter(|_| im.data_file);
    Ok(Meta {
        data_file_name,
        virtual_size: im.header.guest_size(),
        header: im.header,
        file_len,
        l1,
        l1_offset,
        backing_name,
        backing_format: im.backing_format,
        snapshot: snap,
        snapshots: im.snapshots,
    })
}

/// The snapshot `want` names: `snapshot.id=ID` matches IDs only,
/// `snapshot.name=NAME` names only (qemu-img's `-l` syntax; both, separated by a
/// comma, must match the same snapshot); a bare word matches an ID first, then a
/// name.
fn find_snapshot(snaps: &[Snapshot], want: &str) -> Result<Snapshot> {
    let (mut id, mut name) = (None, None);
    if want.starts_with("snapshot.") {
        for part in want.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "bad snapshot option {part:?}: use snapshot.id=ID or snapshot.name=NAME"
                    )))
                }
            }
        }
    }
    let found = if id.is_some() || name.is_some() {
        snaps
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
    } else {
        let by_id = snaps.iter().position(|s| s.id == want);
        by_id.or_else(|| snaps.iter().position(|s| s.name == want))
    };
    if let Some(i) = found {
        return Ok(snaps[i].clone());
    }
    let what = match (id, name) {
        (Some(i), Some(n)) => format!("ID {i:?} and name {n:?}"),
        (Some(i), None) => format!("ID {i:?}"),
        (None, Some(n)) => format!("name {n:?}"),
        (None, None) => format!("ID or name {want:?}"),
    };
    Err(Error::InvalidArgument(format!(
        "no snapshot with {what} (the image has {} snapshots)",
        snaps.len()
    )))
}

/// The checks QEMU's `qcow2_snapshot_load_tmp` applies to a snapshot's L1 table
/// (at most 32 MiB, cluster aligned and addressable even when empty), plus the
/// reader's rule for the L1 table it reads: inside the file, not over the header.
fn check_snapshot_l1(header: &Header, snap: &Snapshot, file_len: u64) -> Result<()> {
    let bytes = u64::from(snap.l1_size) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(Error::LimitExceeded(format!(
            "snapshot {}: L1 table of {} entries exceeds QEMU's 32 MiB limit",
            snap.id, snap.l1_size
        )));
    }
    let off = snap.l1_table_offset;
    let bad = |why: String| {
        Error::corrupt(
            "snapshot table",
            snap.entry_offset,
            format!("snapshot {}: L1 table {why}", snap.id),
        )
    };
    if off % header.cluster_size() != 0 || off > i64::MAX as u64 - bytes {
        return Err(bad(format!(
            "offset {off:#x} is invalid (unaligned or too large)"
        )));
    }
    if snap.l1_size == 0 {
        return Ok(());
    }
    if off == 0 {
        return Err(bad("overlaps the header (offset 0)".into()));
    }
    // off + bytes ≤ i64::MAX (checked above).
    if off + bytes > file_len {
        return Err(bad(format!(
            "at {off:#x} ({bytes} bytes) extends past the end of the file"
        )));
    }
    Ok(())
}
