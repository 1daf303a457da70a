//! Opening one qcow2 layer: header, features, extensions, backing file name and
//! format, and the L1 table of the active layer or of a snapshot.
//!
//! Every size read from the file is checked (against the file size and QEMU's
//! limits, through [`Header::validate`]) before anything is allocated from it.

use crate::error::{Error, Result};
use crate::format::extensions::{
    self, QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_CRYPTO_HEADER,
};
use crate::format::header::{
    Header, MAX_L1_BYTES, QCOW2_AUTOCLEAR_DATA_FILE_RAW, QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
};
use crate::format::snapshot::{self, Snapshot};
use crate::io::ReadAt;

/// File offset of the incompatible_features field (for error messages).
const INCOMPATIBLE_FEATURES_FIELD: u64 = 72;
/// File offset of the autoclear_features field.
const AUTOCLEAR_FEATURES_FIELD: u64 = 88;
/// QEMU keeps the backing format name in a 16-byte buffer.
const MAX_BACKING_FORMAT: usize = 16;

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
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("cannot read the qcow2 {what}"), e)
}

/// Reads and checks the header and cluster 0 of `file`, then loads the L1 table of
/// the active layer, or of `snapshot` (matched by ID first, then by name, like
/// `qemu-img convert -l`).
pub(crate) fn read_meta(file: &dyn ReadAt, snapshot: Option<&str>) -> Result<Meta> {
    let file_len = file.len().map_err(io_err("file size"))?;
    let mut hbuf = [0u8; Header::ENCODED_LEN];
    let n = file
        .read_at_zero_fill(&mut hbuf, 0)
        .map_err(io_err("header"))?;
    let header = Header::decode(&hbuf[..n])?;
    header.validate(file_len)?;
    header.check_features()?;
    if header.incompatible_features & QCOW2_INCOMPAT_CORRUPT != 0 {
        return Err(Error::corrupt(
            "header",
            INCOMPATIBLE_FEATURES_FIELD,
            "the image is marked corrupt (incompatible feature bit 1, \"corrupt bit\"); \
             repair it with `qemu-img check -r all` first",
        ));
    }
    if header.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW != 0
        && header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE == 0
    {
        return Err(Error::corrupt(
            "header",
            AUTOCLEAR_FEATURES_FIELD,
            "autoclear bit 1 (raw external data) is set without an external data file",
        ));
    }
    // Dirty images (bit 0) are accepted: see docs/qcow2-input.md.

    // Cluster 0: header extensions and the backing file name. validate() bounded
    // cluster_bits to 9..=21, so this is at most 2 MiB.
    let cs = header.cluster_size();
    let mut c0 = vec![0u8; cs as usize];
    file.read_at_zero_fill(&mut c0, 0)
        .map_err(io_err("header cluster"))?;
    // validate() checked backing_file_offset <= cs and header_length <= cs.
    let ext_end = if header.backing_file_offset != 0 {
        header.backing_file_offset as usize
    } else {
        cs as usize
    };
    let mut backing_format = None;
    for ext in extensions::decode(&c0, header.header_length as usize, ext_end)? {
        match ext.kind {
            QCOW2_EXT_MAGIC_BACKING_FORMAT => {
                if ext.data.len() >= MAX_BACKING_FORMAT {
                    return Err(Error::corrupt(
                        "header extension",
                        ext.offset,
                        format!(
                            "backing format name of {} bytes is too long (QEMU allows 15)",
                            ext.data.len()
                        ),
                    ));
                }
                let end = ext
                    .data
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(ext.data.len());
                backing_format = Some(String::from_utf8_lossy(&ext.data[..end]).into_owned());
            }
            QCOW2_EXT_MAGIC_CRYPTO_HEADER => {
                // crypt_method is 0 here (check_features refused encryption).
                return Err(Error::corrupt(
                    "header extension",
                    ext.offset,
                    "full disk encryption header in an image that is not encrypted",
                ));
            }
            // Feature names, bitmaps (autoclear, no effect on guest data), data file
            // names without the data-file bit, and unknown extensions are ignored.
            _ => {}
        }
    }
    let backing_name = if header.backing_file_offset != 0 && header.backing_file_size > 0 {
        // validate(): offset + size <= cs.
        let start = header.backing_file_offset as usize;
        Some(c0[start..start + header.backing_file_size as usize].to_vec())
    } else {
        None
    };

    // A snapshot's view keeps the image's current size, as `qemu-img convert -l`
    // does (`qcow2_snapshot_load_tmp` switches the L1 table only): the image may
    // have been resized since, and L1 entries past the snapshot's table read as
    // unallocated (the backing file shows through).
    let (l1_offset, l1_size, snap) = match snapshot {
        None => (header.l1_table_offset, header.l1_size, None),
        Some(want) => {
            let snap = find_snapshot(file, &header, file_len, want)?;
            check_snapshot_l1(&header, &snap, file_len)?;
            (snap.l1_table_offset, snap.l1_size, Some(snap))
        }
    };
    // l1_size is bounded (validate / check_snapshot_l1) to 32 MiB inside the file.
    let mut raw = vec![0u8; l1_size as usize * 8];
    if !raw.is_empty() {
        file.read_exact_at(&mut raw, l1_offset)
            .map_err(io_err("L1 table"))?;
    }
    let l1 = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8-byte chunk")))
        .collect();
    Ok(Meta {
        virtual_size: header.size / 512 * 512,
        header,
        file_len,
        l1,
        l1_offset,
        backing_name,
        backing_format,
        snapshot: snap,
    })
}

/// Reads the whole snapshot table (bounded by QEMU's 64 MiB limit and the file).
pub(crate) fn read_snapshots(
    file: &dyn ReadAt,
    header: &Header,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    if header.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    // validate() checked the offset is aligned and nb * 40 bytes lie in the file.
    let avail = file_len
        .saturating_sub(header.snapshots_offset)
        .min(snapshot::MAX_TABLE_BYTES);
    // Most tables are small: try a modest read first, then the whole bound.
    let guess = (u64::from(header.nb_snapshots) * 256).min(avail);
    for len in [guess, avail] {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, header.snapshots_offset)
            .map_err(io_err("snapshot table"))?;
        match snapshot::decode_table(
            &buf,
            header.snapshots_offset,
            header.nb_snapshots,
            header.version,
        ) {
            Ok((snaps, _)) => return Ok(snaps),
            Err(e) if len == avail => return Err(e),
            Err(_) => {}
        }
    }
    unreachable!("the loop returns on its last iteration")
}

fn find_snapshot(
    file: &dyn ReadAt,
    header: &Header,
    file_len: u64,
    want: &str,
) -> Result<Snapshot> {
    let snaps = read_snapshots(file, header, file_len)?;
    let by_id = snaps.iter().position(|s| s.id == want);
    let by_name = || snaps.iter().position(|s| s.name == want);
    match by_id.or_else(by_name) {
        Some(i) => Ok(snaps.into_iter().nth(i).expect("index found above")),
        None => Err(Error::InvalidArgument(format!(
            "no snapshot with ID or name {want:?} (the image has {} snapshots)",
            snaps.len()
        ))),
    }
}

/// The checks QEMU's `qcow2_snapshot_load_tmp` applies to a snapshot's L1 table.
fn check_snapshot_l1(header: &Header, snap: &Snapshot, file_len: u64) -> Result<()> {
    let bytes = u64::from(snap.l1_size) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(Error::LimitExceeded(format!(
            "snapshot {}: L1 table of {} entries exceeds QEMU's 32 MiB limit",
            snap.id, snap.l1_size
        )));
    }
    if snap.l1_size == 0 {
        return Ok(());
    }
    let off = snap.l1_table_offset;
    if off % header.cluster_size() != 0 || off == 0 {
        return Err(Error::corrupt(
            "snapshot table",
            snap.entry_offset,
            format!(
                "snapshot {}: L1 table offset {off:#x} is not cluster aligned",
                snap.id
            ),
        ));
    }
    match off.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            "snapshot table",
            snap.entry_offset,
            format!(
                "snapshot {}: L1 table at {off:#x} ({bytes} bytes) extends past the end of the file",
                snap.id
            ),
        )),
    }
}
