//! [`Image::open`]: the header and cluster 0, checked as `qcow2_do_open` checks
//! them, and (for a plain open) the snapshot table, as `qcow2_read_snapshots`
//! reads it.

use std::fmt;

use crate::error::{Error, IoContext, Result};
use crate::format::extensions::{
    self, Extension, QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_EXT_MAGIC_CRYPTO_HEADER, QCOW2_EXT_MAGIC_DATA_FILE,
};
use crate::format::header::{
    off, CompressionType, Header, OpenMode, QCOW2_AUTOCLEAR_BITMAPS, QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DATA_FILE,
};
use crate::format::snapshot::{self, Snapshot};
use crate::io::ReadAt;

use super::bitmaps;

/// QEMU keeps the backing format name in a 16-byte buffer (15 bytes and a NUL).
const MAX_BACKING_FORMAT: usize = 16;
/// QEMU's limit on the number of persistent bitmaps (`QCOW2_MAX_BITMAPS`).
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub(crate) const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Length of the bitmaps extension data.
const BITMAPS_EXT_LEN: usize = 24;
/// Length of the crypto header extension data.
const CRYPTO_EXT_LEN: usize = 16;

/// The bitmaps header extension (u32 `nb_bitmaps`, u32 reserved, u64 directory
/// size, u64 directory offset), recorded when QEMU uses it: autoclear bit 0 set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// File offset of the extension (its type field).
    pub extension_offset: u64,
    /// Number of bitmaps (1..=65535).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes (at most 64 MiB).
    pub directory_size: u64,
    /// Offset of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

/// Where the LUKS header lies (the crypto header extension: u64 offset, u64
/// length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeader {
    /// File offset of the extension (its type field).
    pub extension_offset: u64,
    /// Offset of the LUKS header (cluster aligned).
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// A condition the opener records instead of refusing, because commands treat it
/// differently: reading guest data (`convert`, `compare`, `map`, the qcow2
/// source) refuses each of them, `info` describes them, and `check` checks
/// encrypted, data-file and corrupt-marked images (QEMU's check opens them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caveat {
    /// `crypt_method` 1 (AES) or 2 (LUKS): guest data is encrypted.
    Encrypted(u32),
    /// Incompatible bit 2: guest data lives in an external data file, named by
    /// the data file extension (`None` if the image does not name it, which QEMU
    /// refuses to open).
    ExternalDataFile(Option<String>),
    /// Incompatible bit 1: QEMU found inconsistent metadata and marked the image
    /// corrupt (it still opens it read-only).
    MarkedCorrupt,
    /// Autoclear bit 1 (data-file-raw) without an external data file: QEMU refuses
    /// to open the image, except for `qemu-img info`.
    RawDataFileWithoutDataFile,
}

impl Caveat {
    /// Whether guest data can still be read: a named external data file can be
    /// (the reader opens it); nothing else can.
    pub fn readable(&self) -> bool {
        matches!(self, Caveat::ExternalDataFile(Some(_)))
    }

    /// The error a command that cannot accept the condition reports.
    pub fn error(&self) -> Error {
        match self {
            Caveat::Encrypted(1) => Error::Unsupported("encrypted image (AES)".into()),
            Caveat::Encrypted(_) => Error::Unsupported("encrypted image (LUKS)".into()),
            Caveat::ExternalDataFile(Some(name)) => {
                Error::Unsupported(format!("external data file {name:?}"))
            }
            Caveat::ExternalDataFile(None) => Error::Unsupported(
                "external data file, and the image does not name it \
                 (QEMU: 'data-file' is required for this image)"
                    .into(),
            ),
            Caveat::MarkedCorrupt => Error::corrupt(
                "header",
                off::INCOMPATIBLE_FEATURES as u64,
                "the image is marked corrupt (incompatible feature bit 1, \"corrupt bit\"); \
                 repair it with `qemu-img check -r all` first",
            ),
            Caveat::RawDataFileWithoutDataFile => Error::corrupt(
                "header",
                off::AUTOCLEAR_FEATURES as u64,
                "autoclear bit 1 (raw external data) is set without an external data file \
                 (QEMU: data-file-raw requires a data file)",
            ),
        }
    }
}

impl fmt::Display for Caveat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caveat::Encrypted(m) => write!(
                f,
                "guest data is encrypted ({}); qdedup cannot read it",
                if *m == 1 { "AES" } else { "LUKS" }
            ),
            Caveat::ExternalDataFile(Some(name)) => {
                write!(f, "guest data is in the external data file {name:?}")
            }
            Caveat::ExternalDataFile(None) => f.write_str(
                "incompatible bit 2 (external data file) is set but no header extension names \
                 the file; QEMU refuses to open the image",
            ),
            Caveat::MarkedCorrupt => f.write_str(
                "the image is marked corrupt (incompatible bit 1); convert refuses it until \
                 `qemu-img check -r all` repairs it",
            ),
            Caveat::RawDataFileWithoutDataFile => f.write_str(
                "autoclear bit 1 (data-file-raw) is set without an external data file; QEMU \
                 refuses to open the image for anything but info",
            ),
        }
    }
}

/// An opened qcow2 image: its header, the derived geometry and what cluster 0
/// holds, all checked as QEMU checks them at open.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Image {
    /// The decoded header.
    pub header: Header,
    /// The open this image passed.
    pub mode: OpenMode,
    /// Length of the file.
    pub file_len: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Extended L2 entries (incompatible bit 4).
    pub extended_l2: bool,
    /// Bytes per L2 entry (8 or 16).
    pub l2_entry_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Incompatible bit 2: guest data lives in an external data file.
    pub data_file: bool,
    /// The compression type of compressed clusters.
    pub compression: CompressionType,
    /// The header extensions, in file order.
    pub extensions: Vec<Extension>,
    /// The backing file name bytes as stored, when `backing_file_offset` is set
    /// (possibly empty; QEMU then uses no backing file).
    pub backing_name: Option<Vec<u8>>,
    /// The backing format from its header extension (the last one, as in QEMU).
    pub backing_format: Option<String>,
    /// The external data file name from its header extension.
    pub data_file_name: Option<String>,
    /// The bitmaps extension, if QEMU uses it (autoclear bit 0 set).
    pub bitmaps: Option<BitmapsExtension>,
    /// The crypto header extension (LUKS images).
    pub crypto_header: Option<CryptoHeader>,
    /// The snapshot table, read at a plain open as QEMU reads it ([`OpenMode::Read`];
    /// under [`OpenMode::Check`] QEMU reads it in its check, and so does `check`).
    pub snapshots: Vec<Snapshot>,
    /// Length of the snapshot table in bytes (0 when not read).
    pub snapshots_size: u64,
    /// Conditions commands treat differently (see [`Caveat`]).
    pub caveats: Vec<Caveat>,
}

impl Image {
    /// Opens the qcow2 image `file` as QEMU would in `mode`. Errors are what QEMU
    /// refuses to open, naming the structure and its offset; see the module doc for
    /// what is recorded instead.
    pub fn open<R: ReadAt + ?Sized>(file: &R, mode: OpenMode) -> Result<Self> {
        let file_len = file.len().ctx(|| "reading the image size".into())?;
        let mut first = [0u8; Header::ENCODED_LEN];
        let n = file
            .read_at_zero_fill(&mut first, 0)
            .ctx(|| "reading the qcow2 header".into())?;
        let header = Header::decode(&first[..n])?;
        header.validate_open(mode)?;
        let compression = header.compression()?;
        let cluster_size = header.cluster_size();
        // validate_open bounded cluster_bits to 9..=21, so this is at most 2 MiB.
        let mut cluster0 = vec![0u8; cluster_size as usize];
        file.read_at_zero_fill(&mut cluster0, 0)
            .ctx(|| "reading cluster 0".into())?;
        // validate_open: backing_file_offset ≤ cluster size, header_length ≤
        // cluster size (v3; the v2 header is 72 bytes).
        let ext_end = match header.backing_file_offset {
            0 => cluster0.len(),
            o => o as usize,
        };
        let extensions = extensions::decode(&cluster0, header.header_length as usize, ext_end)?;
        let backing_name = (header.backing_file_offset != 0).then(|| {
            // validate_open: offset + size ≤ cluster size.
            let from = header.backing_file_offset as usize;
            cluster0[from..from + header.backing_file_size as usize].to_vec()
        });
        let mut im = Image {
            mode,
            file_len,
            cluster_bits: header.cluster_bits,
            cluster_size,
            extended_l2: header.extended_l2(),
            l2_entry_size: header.l2_entry_size(),
            l2_entries: header.l2_entries(),
            data_file: header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE != 0,
            compression,
            extensions: Vec::new(),
            backing_name,
            backing_format: None,
            data_file_name: None,
            bitmaps: None,
            crypto_header: None,
            snapshots: Vec::new(),
            snapshots_size: 0,
            caveats: Vec::new(),
            header,
        };
        for ext in &extensions {
            im.read_extension(ext)?;
        }
        im.extensions = extensions;
        im.note_caveats()?;
        if mode == OpenMode::Read {
            let (snapshots, size) = read_snapshot_table(file, &im.header, file_len)?;
            im.snapshots = snapshots;
            im.snapshots_size = size;
        }
        // QEMU loads the bitmaps at every open; `check` reports what fails here
        // as check errors instead, with the rest of its findings.
        if let (Some(ext), OpenMode::Read) = (&im.bitmaps, mode) {
            bitmaps::load(file, ext, file_len, cluster_size, im.header.size)?;
        }
        Ok(im)
    }

    /// QEMU's `qcow2_read_extensions`, one extension.
    fn read_extension(&mut self, ext: &Extension) -> Result<()> {
        let bad = |detail: String| Error::corrupt("header extension", ext.offset, detail);
        let be64 = |at: usize| {
            // Callers checked the length of the data.
            u64::from_be_bytes(ext.data[at..at + 8].try_into().expect("8 bytes"))
        };
        match ext.kind {
            QCOW2_EXT_MAGIC_BACKING_FORMAT => {
                if ext.data.len() >= MAX_BACKING_FORMAT {
                    return Err(bad(format!(
                        "backing format name of {} bytes is too long (QEMU allows 15)",
                        ext.data.len()
                    )));
                }
                let end = ext.data.iter().position(|b| *b == 0);
                let name = &ext.data[..end.unwrap_or(ext.data.len())];
                self.backing_format = Some(String::from_utf8_lossy(name).into_owned());
            }
            QCOW2_EXT_MAGIC_CRYPTO_HEADER => {
                if self.header.crypt_method != 2 {
                    return Err(bad(
                        "crypto header extension in an image without LUKS encryption \
                         (QEMU: only expected with LUKS encryption method)"
                            .into(),
                    ));
                }
                if ext.data.len() != CRYPTO_EXT_LEN {
                    return Err(bad(format!(
                        "crypto header extension has {} bytes, expected {CRYPTO_EXT_LEN}",
                        ext.data.len()
                    )));
                }
                let (offset, length) = (be64(0), be64(8));
                if offset % self.cluster_size != 0 {
                    return Err(bad(format!(
                        "LUKS header offset {offset:#x} is not cluster aligned"
                    )));
                }
                self.crypto_header = Some(CryptoHeader {
                    extension_offset: ext.offset,
                    offset,
                    length,
                });
            }
            QCOW2_EXT_MAGIC_BITMAPS => {
                if ext.data.len() != BITMAPS_EXT_LEN {
                    return Err(bad(format!(
                        "bitmaps extension has {} bytes, expected {BITMAPS_EXT_LEN}",
                        ext.data.len()
                    )));
                }
                if self.header.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS == 0 {
                    // QEMU warns that the bitmaps are inconsistent and ignores them.
                    return Ok(());
                }
                let word = |at: usize| {
                    u32::from_be_bytes(ext.data[at..at + 4].try_into().expect("4 bytes"))
                };
                let (nb, reserved) = (word(0), word(4));
                let (size, offset) = (be64(8), be64(16));
                if reserved != 0
                    || nb == 0
                    || nb > MAX_BITMAPS
                    || offset % self.cluster_size != 0
                    || size > MAX_BITMAP_DIRECTORY_SIZE
                {
                    return Err(bad(format!(
                        "invalid bitmaps extension: {nb} bitmaps, reserved {reserved:#x}, \
                         directory at {offset:#x} of {size} bytes"
                    )));
                }
                self.bitmaps = Some(BitmapsExtension {
                    extension_offset: ext.offset,
                    nb_bitmaps: nb,
                    directory_size: size,
                    directory_offset: offset,
                });
            }
            QCOW2_EXT_MAGIC_DATA_FILE => {
                let end = ext.data.iter().position(|b| *b == 0);
                let name = &ext.data[..end.unwrap_or(ext.data.len())];
                self.data_file_name = Some(String::from_utf8_lossy(name).into_owned());
            }
            // Feature names and unknown extensions are kept, not interpreted.
            _ => {}
        }
        Ok(())
    }

    /// Records the caveats; under [`OpenMode::Check`], refuses those QEMU's check
    /// cannot open (a data file that is not named, data-file-raw without one).
    fn note_caveats(&mut self) -> Result<()> {
        let h = &self.header;
        let mut caveats = Vec::new();
        if h.crypt_method != 0 {
            caveats.push(Caveat::Encrypted(h.crypt_method));
        }
        if self.data_file {
            let named = self.data_file_name.clone();
            if named.is_none() && self.mode == OpenMode::Check {
                return Err(Caveat::ExternalDataFile(None).error());
            }
            caveats.push(Caveat::ExternalDataFile(named));
        } else if h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW != 0 {
            if self.mode == OpenMode::Check {
                return Err(Caveat::RawDataFileWithoutDataFile.error());
            }
            caveats.push(Caveat::RawDataFileWithoutDataFile);
        }
        if h.incompatible_features & QCOW2_INCOMPAT_CORRUPT != 0 {
            caveats.push(Caveat::MarkedCorrupt);
        }
        self.caveats = caveats;
        Ok(())
    }

    /// Refuses every caveat that keeps guest data from being read, the first one
    /// by name: all but a named external data file (which the reader opens).
    pub fn refuse_caveats(&self) -> Result<()> {
        match self.caveats.iter().find(|c| !c.readable()) {
            Some(c) => Err(c.error()),
            None => Ok(()),
        }
    }

    /// The first extension of type `kind`.
    pub fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }

    /// The backing file name QEMU uses: the stored name, unless it is empty.
    pub fn backing_file(&self) -> Option<&[u8]> {
        self.backing_name.as_deref().filter(|n| !n.is_empty())
    }
}

/// Reads the snapshot table of `header` as QEMU's `qcow2_read_snapshots` does:
/// bytes past the end of the file read as zeros, the table may span at most
/// 64 MiB, an entry at most 1024 bytes of extra data. Returns the entries and the
/// table's length. v3 entries with less than 16 bytes of extra data are accepted
/// (QEMU opens such images; its check counts them as corruptions).
pub fn read_snapshot_table<R: ReadAt + ?Sized>(
    file: &R,
    header: &Header,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let nb = header.nb_snapshots;
    if nb == 0 {
        return Ok((Vec::new(), 0));
    }
    let off = header.snapshots_offset;
    // validate_open: nb ≤ 65536, and 40·nb bytes at `off` end before QEMU's largest
    // offset; the most the entries can span is bounded by QEMU's 64 MiB.
    let full = snapshot::MAX_TABLE_BYTES.min(u64::from(nb) * snapshot::MAX_ENTRY);
    // Most tables are small: try a modest read first, then the whole bound. Only the
    // part inside the file is read; the rest of the (calloc'd) buffer stays zero.
    let guess = (u64::from(nb) * 256).min(full);
    for len in [guess, full] {
        let mut buf = vec![0u8; len as usize];
        let in_file = file_len.saturating_sub(off).min(len) as usize;
        file.read_at_zero_fill(&mut buf[..in_file], off)
            .ctx(|| format!("reading the snapshot table at {off:#x}"))?;
        match snapshot::decode_table_lenient(&buf, off, nb) {
            Ok(r) => return Ok(r),
            Err(e) if len == full => return Err(e),
            Err(_) => {}
        }
    }
    unreachable!("the loop returns on its last iteration")
}
