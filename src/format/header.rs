//! The qcow2 header (cluster 0, big-endian).
//!
//! | offset | size | field                     | notes                                   |
//! |-------:|-----:|---------------------------|-----------------------------------------|
//! |      0 |    4 | magic `QFI\xfb`           |                                         |
//! |      4 |    4 | version                   | 2 or 3                                  |
//! |      8 |    8 | backing_file_offset       | 0 = no backing file                     |
//! |     16 |    4 | backing_file_size         | ≤ 1023                                  |
//! |     20 |    4 | cluster_bits              | 9..=21                                  |
//! |     24 |    8 | size                      | virtual size in bytes                   |
//! |     32 |    4 | crypt_method              | 0 none, 1 AES, 2 LUKS                   |
//! |     36 |    4 | l1_size                   | entries                                 |
//! |     40 |    8 | l1_table_offset           | cluster aligned                         |
//! |     48 |    8 | refcount_table_offset     | cluster aligned                         |
//! |     56 |    4 | refcount_table_clusters   |                                         |
//! |     60 |    4 | nb_snapshots              |                                         |
//! |     64 |    8 | snapshots_offset          | v2 header ends at 72                    |
//! |     72 |    8 | incompatible_features     | v3 only                                 |
//! |     80 |    8 | compatible_features       |                                         |
//! |     88 |    8 | autoclear_features        |                                         |
//! |     96 |    4 | refcount_order            | refcount_bits = 1 << refcount_order     |
//! |    100 |    4 | header_length             | ≥ 104, multiple of 8                    |
//! |    104 |    1 | compression_type          | 0 zlib, 1 zstd; needs header_length ≥ 112 |
//! |    105 |    7 | padding                   | zero                                    |
//!
//! [`Header::decode`] only reads fields; [`Header::validate_open`] makes QEMU's checks
//! (`qcow2_do_open`) before anything uses them for arithmetic, and
//! [`Header::validate`] adds the reader's bound of the L1 table by the file size.

use crate::error::{Error, Result};

/// `QCOW_MAGIC`: `'Q' 'F' 'I' 0xfb`.
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bit 0: the image is dirty (lazy refcounts not written back).
pub const QCOW2_INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is marked corrupt.
pub const QCOW2_INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression_type field is non-zero.
pub const QCOW2_INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const QCOW2_INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits this crate knows about.
pub const QCOW2_INCOMPAT_MASK: u64 = 0x1f;

/// Compatible feature bit 0: lazy refcounts.
pub const QCOW2_COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const QCOW2_AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is raw.
pub const QCOW2_AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Length of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Header length qdedup writes (includes the compression type byte and padding).
pub const V3_HEADER_LENGTH: u32 = 112;

/// Smallest cluster_bits QEMU accepts (512 B clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Offset and value limit of host offsets (bits 9..=55 of an L2 entry).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// File offsets of the header fields, each following from the previous one (the
/// byte table above). Other modules name a field by these, e.g. in error offsets.
pub mod off {
    /// `magic`.
    pub const MAGIC: usize = 0;
    /// `version`.
    pub const VERSION: usize = MAGIC + 4;
    /// `backing_file_offset`.
    pub const BACKING_FILE_OFFSET: usize = VERSION + 4;
    /// `backing_file_size`.
    pub const BACKING_FILE_SIZE: usize = BACKING_FILE_OFFSET + 8;
    /// `cluster_bits`.
    pub const CLUSTER_BITS: usize = BACKING_FILE_SIZE + 4;
    /// `size` (virtual disk size).
    pub const SIZE: usize = CLUSTER_BITS + 4;
    /// `crypt_method`.
    pub const CRYPT_METHOD: usize = SIZE + 8;
    /// `l1_size`.
    pub const L1_SIZE: usize = CRYPT_METHOD + 4;
    /// `l1_table_offset`.
    pub const L1_TABLE_OFFSET: usize = L1_SIZE + 4;
    /// `refcount_table_offset`.
    pub const REFCOUNT_TABLE_OFFSET: usize = L1_TABLE_OFFSET + 8;
    /// `refcount_table_clusters`.
    pub const REFCOUNT_TABLE_CLUSTERS: usize = REFCOUNT_TABLE_OFFSET + 8;
    /// `nb_snapshots`.
    pub const NB_SNAPSHOTS: usize = REFCOUNT_TABLE_CLUSTERS + 4;
    /// `snapshots_offset`.
    pub const SNAPSHOTS_OFFSET: usize = NB_SNAPSHOTS + 4;
    /// `incompatible_features` (v3).
    pub const INCOMPATIBLE_FEATURES: usize = SNAPSHOTS_OFFSET + 8;
    /// `compatible_features` (v3).
    pub const COMPATIBLE_FEATURES: usize = INCOMPATIBLE_FEATURES + 8;
    /// `autoclear_features` (v3).
    pub const AUTOCLEAR_FEATURES: usize = COMPATIBLE_FEATURES + 8;
    /// `refcount_order` (v3).
    pub const REFCOUNT_ORDER: usize = AUTOCLEAR_FEATURES + 8;
    /// `header_length` (v3).
    pub const HEADER_LENGTH: usize = REFCOUNT_ORDER + 4;
    /// `compression_type` (v3, present when `header_length` > 104).
    pub const COMPRESSION_TYPE: usize = HEADER_LENGTH + 4;
    /// End of the header qdedup reads and writes (compression type plus padding).
    pub const END: usize = COMPRESSION_TYPE + 8;
}

/// How an image is opened, which decides a few of QEMU's header checks
/// (`qcow2_do_open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// A plain open, as for `qemu-img convert`, `info`, `map` or `compare`.
    Read,
    /// QEMU's `BDRV_O_CHECK` open (`qemu-img check`): a refcount table of zero
    /// clusters is accepted (the check then reports every cluster as a corruption).
    Check,
}

/// Compression type of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib"); value 0.
    Zlib,
    /// zstd frames; value 1.
    Zstd,
}

impl CompressionType {
    /// The on-disk value.
    pub fn to_raw(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A decoded qcow2 header. Fields beyond `header_length` read as zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order (v2: 4).
    pub refcount_order: u32,
    /// Header length in bytes (v2: 72).
    pub header_length: u32,
    /// Raw compression type byte (0 if the header is shorter than 105 bytes).
    pub compression_type: u8,
}

fn be32(buf: &[u8], at: usize) -> u32 {
    // Callers guarantee `buf.len() >= off::END` (checked in `decode`).
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4-byte slice"))
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8-byte slice"))
}

/// QEMU's `BDRV_MAX_LENGTH`: INT64_MAX rounded down to 1 GiB. No request may end past
/// it, so QEMU cannot open an image whose tables lie there.
pub const QEMU_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

impl Header {
    /// Number of bytes [`Header::encode`] writes and [`Header::decode`] wants to see.
    pub const ENCODED_LEN: usize = off::END;

    /// A fresh v3 header for an image qdedup writes.
    pub fn new_v3(cluster_bits: u32, refcount_order: u32, size: u64) -> Self {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: V3_HEADER_LENGTH,
            compression_type: 0,
        }
    }

    /// Decodes the raw fields. `buf` is the start of the file; if it is shorter than
    /// the header, the header is truncated (an error). Only the magic and version are
    /// checked here; call [`Header::validate`] before using any other field.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        if buf.len() < 8 {
            return Err(Error::corrupt(
                "header",
                0,
                "file too short for a qcow2 header",
            ));
        }
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != QCOW_MAGIC {
            return Err(Error::corrupt(
                "header",
                0,
                format!("bad magic {magic:#010x}"),
            ));
        }
        let version = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let need = if version == 2 {
            V2_HEADER_LENGTH as usize
        } else {
            V3_MIN_HEADER_LENGTH as usize
        };
        if buf.len() < need {
            return Err(Error::corrupt(
                "header",
                0,
                format!(
                    "truncated: {} bytes, version {version} needs {need}",
                    buf.len()
                ),
            ));
        }
        // Zero-extend so that absent fields read as zero.
        let mut b = [0u8; off::END];
        let n = buf.len().min(off::END);
        b[..n].copy_from_slice(&buf[..n]);
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, off::BACKING_FILE_OFFSET),
            backing_file_size: be32(&b, off::BACKING_FILE_SIZE),
            cluster_bits: be32(&b, off::CLUSTER_BITS),
            size: be64(&b, off::SIZE),
            crypt_method: be32(&b, off::CRYPT_METHOD),
            l1_size: be32(&b, off::L1_SIZE),
            l1_table_offset: be64(&b, off::L1_TABLE_OFFSET),
            refcount_table_offset: be64(&b, off::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: be32(&b, off::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: be32(&b, off::NB_SNAPSHOTS),
            snapshots_offset: be64(&b, off::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
        };
        if version == 3 {
            h.incompatible_features = be64(&b, off::INCOMPATIBLE_FEATURES);
            h.compatible_features = be64(&b, off::COMPATIBLE_FEATURES);
            h.autoclear_features = be64(&b, off::AUTOCLEAR_FEATURES);
            h.refcount_order = be32(&b, off::REFCOUNT_ORDER);
            h.header_length = be32(&b, off::HEADER_LENGTH);
            // The compression type is present only if the header covers byte 104.
            if h.header_length as usize > off::COMPRESSION_TYPE && buf.len() > off::COMPRESSION_TYPE
            {
                h.compression_type = b[off::COMPRESSION_TYPE];
            }
        }
        Ok(h)
    }

    /// Encodes the header into `buf` (at least [`Header::ENCODED_LEN`] bytes).
    pub fn encode(&self, buf: &mut [u8]) {
        let b = &mut buf[..off::END];
        b.fill(0);
        b[off::MAGIC..off::MAGIC + 4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(b, off::VERSION, self.version);
        put64(b, off::BACKING_FILE_OFFSET, self.backing_file_offset);
        put32(b, off::BACKING_FILE_SIZE, self.backing_file_size);
        put32(b, off::CLUSTER_BITS, self.cluster_bits);
        put64(b, off::SIZE, self.size);
        put32(b, off::CRYPT_METHOD, self.crypt_method);
        put32(b, off::L1_SIZE, self.l1_size);
        put64(b, off::L1_TABLE_OFFSET, self.l1_table_offset);
        put64(b, off::REFCOUNT_TABLE_OFFSET, self.refcount_table_offset);
        put32(
            b,
            off::REFCOUNT_TABLE_CLUSTERS,
            self.refcount_table_clusters,
        );
        put32(b, off::NB_SNAPSHOTS, self.nb_snapshots);
        put64(b, off::SNAPSHOTS_OFFSET, self.snapshots_offset);
        if self.version >= 3 {
            put64(b, off::INCOMPATIBLE_FEATURES, self.incompatible_features);
            put64(b, off::COMPATIBLE_FEATURES, self.compatible_features);
            put64(b, off::AUTOCLEAR_FEATURES, self.autoclear_features);
            put32(b, off::REFCOUNT_ORDER, self.refcount_order);
            put32(b, off::HEADER_LENGTH, self.header_length);
            b[off::COMPRESSION_TYPE] = self.compression_type;
        }
    }

    /// The guest size QEMU uses: `size` floored to 512 bytes (QEMU counts the
    /// disk in sectors, `total_sectors = size / 512`).
    pub fn guest_size(&self) -> u64 {
        self.size / 512 * 512
    }

    /// Cluster size in bytes. Only meaningful after [`Header::validate`].
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount width in bits. Only meaningful after [`Header::validate`].
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }

    /// Whether L2 entries are extended (16 bytes, with subcluster bitmaps).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & QCOW2_INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// The decoded compression type.
    pub fn compression(&self) -> Result<CompressionType> {
        match self.compression_type {
            0 => Ok(CompressionType::Zlib),
            1 => Ok(CompressionType::Zstd),
            t => Err(Error::Unsupported(format!("compression type {t}"))),
        }
    }

    /// The header checks QEMU's `qcow2_do_open` makes, in its order, for an open in
    /// `mode`: what fails here QEMU refuses to open (`qemu-img check` exits 1).
    /// After this returns `Ok`, shifts by `cluster_bits`/`refcount_order` are safe,
    /// the L1, refcount and snapshot tables are aligned and end before
    /// [`QEMU_MAX_LENGTH`], and the sizes of the L1 and refcount tables are bounded
    /// by QEMU's limits. The tables may still extend past the end of the file: QEMU
    /// reads zeros there (see [`Header::validate`] for the reader's stricter rule).
    ///
    /// One deliberate difference: `header_length` must be a multiple of 8, as the
    /// specification says (QEMU does not insist).
    ///
    /// What QEMU checks in the header extensions and the snapshot table, and the
    /// features each command treats differently (encryption, external data files,
    /// the corrupt bit), are left to the image opener (`qdedup::image`).
    pub fn validate_open(&self, mode: OpenMode) -> Result<()> {
        let corrupt = |off: usize, d: String| Error::corrupt("header", off as u64, d);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(corrupt(
                off::CLUSTER_BITS,
                format!("cluster_bits {} outside 9..=21", self.cluster_bits),
            ));
        }
        let cs = self.cluster_size();
        if self.version == 3
            && (self.header_length < V3_MIN_HEADER_LENGTH
                || u64::from(self.header_length) > cs
                || self.header_length % 8 != 0)
        {
            return Err(corrupt(
                off::HEADER_LENGTH,
                format!(
                    "header_length {} must be a multiple of 8 in 104..={cs}",
                    self.header_length
                ),
            ));
        }
        if self.backing_file_offset > cs {
            return Err(corrupt(
                off::BACKING_FILE_OFFSET,
                format!(
                    "backing file name offset {:#x} beyond cluster 0",
                    self.backing_file_offset
                ),
            ));
        }
        self.validate_compression_type()?;
        let unknown = self.incompatible_features & !QCOW2_INCOMPAT_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(corrupt(
                off::CLUSTER_BITS,
                "extended L2 entries need clusters of at least 16 KiB".into(),
            ));
        }
        if self.refcount_order > 6 {
            return Err(corrupt(
                off::REFCOUNT_ORDER,
                format!("refcount_order {} exceeds 6", self.refcount_order),
            ));
        }
        // Refcount table.
        if self.refcount_table_clusters == 0 && mode == OpenMode::Read {
            return Err(corrupt(
                off::REFCOUNT_TABLE_CLUSTERS,
                "refcount table has zero clusters (the image has no refcount table)".into(),
            ));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::LimitExceeded(format!(
                "header: refcount_table_clusters {} exceeds QEMU's 8 MiB refcount table limit",
                self.refcount_table_clusters
            )));
        }
        self.check_table(
            off::REFCOUNT_TABLE_OFFSET,
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
        )?;
        // Snapshot table: QEMU validates its offset even when there are no snapshots
        // (a plain open here, `qemu-img check` in its snapshot pass; both refuse).
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::LimitExceeded(format!(
                "header: {} snapshots exceed QEMU's limit of {MAX_SNAPSHOTS}",
                self.nb_snapshots
            )));
        }
        // Each entry is at least 40 bytes; the rest is checked when the table is read.
        self.check_table(
            off::SNAPSHOTS_OFFSET,
            "snapshot table",
            self.snapshots_offset,
            u64::from(self.nb_snapshots) * 40,
        )?;
        // L1 table.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::LimitExceeded(format!(
                "header: l1_size {} exceeds QEMU's 32 MiB L1 limit",
                self.l1_size
            )));
        }
        self.check_table(
            off::L1_TABLE_OFFSET,
            "L1 table",
            self.l1_table_offset,
            l1_bytes,
        )?;
        let need_l1 = self.size.div_ceil(cs).div_ceil(self.l2_entries());
        if u64::from(self.l1_size) < need_l1 {
            return Err(corrupt(
                off::L1_SIZE,
                format!(
                    "l1_size {} too small for virtual size {} (needs {need_l1})",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.crypt_method > 2 {
            return Err(Error::Unsupported(format!(
                "encryption method {}",
                self.crypt_method
            )));
        }
        if self.backing_file_offset != 0
            && (self.backing_file_size > MAX_BACKING_FILE_NAME
                || self.backing_file_offset + u64::from(self.backing_file_size) > cs)
        {
            return Err(corrupt(
                off::BACKING_FILE_SIZE,
                format!(
                    "backing file name length {} too long",
                    self.backing_file_size
                ),
            ));
        }
        Ok(())
    }

    /// [`Header::validate_open`] for reading, plus the reader's own rule on the one
    /// table it reads: an active L1 table (of at least one entry) must lie inside
    /// the file and not at offset 0, over the header (QEMU would read zeros or header
    /// bytes as L1 entries; `check` reports both as corruptions). The refcount and
    /// snapshot tables are held to QEMU's rules only: reading guest data does not
    /// use refcounts, and QEMU reads zeros past the end of the file.
    pub fn validate(&self, file_size: u64) -> Result<()> {
        self.validate_open(OpenMode::Read)?;
        self.validate_l1_in_file(file_size)
    }

    /// The reader's rule of [`Header::validate`] alone, for a header that passed
    /// [`Header::validate_open`].
    pub fn validate_l1_in_file(&self, file_size: u64) -> Result<()> {
        if self.l1_size == 0 {
            return Ok(());
        }
        let field = off::L1_TABLE_OFFSET as u64;
        let offset = self.l1_table_offset;
        if offset == 0 {
            return Err(Error::corrupt(
                "header",
                field,
                "L1 table overlaps the header (offset 0)",
            ));
        }
        let len = u64::from(self.l1_size) * 8;
        // validate_open: offset + len <= QEMU_MAX_LENGTH, no overflow.
        if offset + len > file_size {
            return Err(Error::corrupt(
                "header",
                field,
                format!(
                    "L1 table at {offset:#x} ({len} bytes) extends past the end of the file \
                     ({file_size} bytes)"
                ),
            ));
        }
        Ok(())
    }

    /// QEMU's `qcow2_validate_table` for the table of `len` bytes at `offset`:
    /// cluster aligned and addressable (QEMU takes offsets as `int64_t`); a table
    /// that is not empty is read at open, so it must also end before
    /// [`QEMU_MAX_LENGTH`], past which QEMU cannot read.
    fn check_table(&self, field: usize, what: &str, offset: u64, len: u64) -> Result<()> {
        let bad = |detail: String| Error::corrupt("header", field as u64, detail);
        if offset & (self.cluster_size() - 1) != 0 {
            return Err(bad(format!(
                "{what} offset {offset:#x} is not cluster aligned"
            )));
        }
        let limit = if len == 0 {
            i64::MAX as u64
        } else {
            QEMU_MAX_LENGTH
        };
        match offset.checked_add(len) {
            Some(end) if end <= limit => Ok(()),
            _ => Err(bad(format!(
                "{what} offset {offset:#x} is invalid: the table would end past QEMU's \
                 largest file offset ({limit:#x})"
            ))),
        }
    }

    /// QEMU's `validate_compression_type`: a known type, and incompatible bit 3 set
    /// exactly when it is not zlib.
    fn validate_compression_type(&self) -> Result<()> {
        self.compression()?;
        let bit = self.incompatible_features & QCOW2_INCOMPAT_COMPRESSION != 0;
        if bit != (self.compression_type != 0) {
            return Err(Error::corrupt(
                "header",
                off::COMPRESSION_TYPE as u64,
                format!(
                    "compression_type {} does not match incompatible feature bit 3",
                    self.compression_type
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn field_offsets_match_the_spec() {
        assert_eq!(off::L1_TABLE_OFFSET, 40);
        assert_eq!(off::SNAPSHOTS_OFFSET, 64);
        assert_eq!(off::INCOMPATIBLE_FEATURES, 72);
        assert_eq!(off::REFCOUNT_ORDER, 96);
        assert_eq!(off::HEADER_LENGTH, 100);
        assert_eq!(off::COMPRESSION_TYPE, 104);
        assert_eq!(off::END, 112);
        assert_eq!(&QCOW_MAGIC.to_be_bytes(), b"QFI\xfb");
    }

    #[test]
    fn v2_header_reads_refcount_order_4() {
        let mut h = Header::new_v3(16, 4, 1 << 20);
        h.version = 2;
        let mut buf = [0u8; 112];
        h.encode(&mut buf);
        let d = Header::decode(&buf[..72]).unwrap();
        assert_eq!(d.refcount_order, 4);
        assert_eq!(d.header_length, 72);
    }

    #[test]
    fn huge_l1_is_a_limit_error() {
        let mut h = Header::new_v3(16, 4, 1 << 20);
        h.l1_size = u32::MAX;
        h.l1_table_offset = 65536;
        h.refcount_table_offset = 131_072;
        h.refcount_table_clusters = 1;
        assert!(matches!(h.validate(1 << 30), Err(Error::LimitExceeded(_))));
    }

    #[test]
    fn cluster_bits_out_of_range_is_corrupt() {
        let mut h = Header::new_v3(16, 4, 0);
        h.cluster_bits = 63;
        assert!(matches!(
            h.validate(1 << 30),
            Err(Error::Corrupt {
                structure: "header",
                offset: 20,
                ..
            })
        ));
    }

    /// A valid 1 MiB image layout: L1 at 3 clusters, refcount table at 1.
    fn sound() -> Header {
        let mut h = Header::new_v3(16, 4, 1 << 20);
        h.l1_size = 1;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    fn refused_at(r: &Result<()>, field: usize) -> bool {
        matches!(r, Err(Error::Corrupt { structure: "header", offset, .. }) if *offset == field as u64)
    }

    #[test]
    fn an_invalid_snapshot_table_offset_is_refused_without_snapshots() {
        let mut h = sound();
        h.snapshots_offset = 0xc000_0000_0000_0000;
        for mode in [OpenMode::Read, OpenMode::Check] {
            assert!(refused_at(&h.validate_open(mode), off::SNAPSHOTS_OFFSET));
        }
        // Aligned and addressable: QEMU accepts it when there is nothing to read.
        h.snapshots_offset = 0x7fff_ffff_ffff_0000;
        assert!(h.validate_open(OpenMode::Read).is_ok());
    }

    #[test]
    fn an_unaligned_l1_offset_is_refused_even_for_an_empty_table() {
        let mut h = Header::new_v3(16, 4, 0);
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.l1_table_offset = 0x30200;
        assert!(refused_at(
            &h.validate_open(OpenMode::Read),
            off::L1_TABLE_OFFSET
        ));
    }

    #[test]
    fn a_refcount_table_of_zero_clusters_is_opened_only_for_checking() {
        let mut h = sound();
        h.refcount_table_clusters = 0;
        assert!(refused_at(
            &h.validate_open(OpenMode::Read),
            off::REFCOUNT_TABLE_CLUSTERS
        ));
        assert!(h.validate_open(OpenMode::Check).is_ok());
    }

    #[test]
    fn only_the_l1_table_is_bounded_by_the_file_for_reading() {
        let mut h = sound();
        h.refcount_table_offset = 1 << 40;
        h.refcount_table_clusters = 2;
        h.nb_snapshots = 3;
        h.snapshots_offset = 1 << 41;
        assert!(h.validate(0x40000).is_ok());
        assert!(refused_at(&h.validate(0x30004), off::L1_TABLE_OFFSET));
        h.l1_table_offset = 0;
        assert!(refused_at(&h.validate(1 << 20), off::L1_TABLE_OFFSET));
        assert!(h.validate_open(OpenMode::Check).is_ok());
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(
            cb in 9u32..=21, ro in 0u32..=6, size in any::<u64>(), l1 in any::<u32>(),
            l1o in any::<u64>(), rto in any::<u64>(), rtc in any::<u32>(), ns in any::<u32>(),
            so in any::<u64>(), inc in any::<u64>(), comp in any::<u64>(), ac in any::<u64>(),
            ct in 0u8..2, bfo in any::<u64>(), bfs in any::<u32>(), crypt in any::<u32>(),
        ) {
            let h = Header {
                version: 3, backing_file_offset: bfo, backing_file_size: bfs, cluster_bits: cb,
                size, crypt_method: crypt, l1_size: l1, l1_table_offset: l1o,
                refcount_table_offset: rto, refcount_table_clusters: rtc, nb_snapshots: ns,
                snapshots_offset: so, incompatible_features: inc, compatible_features: comp,
                autoclear_features: ac, refcount_order: ro, header_length: 112, compression_type: ct,
            };
            let mut buf = [0u8; 112];
            h.encode(&mut buf);
            prop_assert_eq!(Header::decode(&buf).unwrap(), h);
        }

        #[test]
        fn decode_and_validate_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), fs in any::<u64>()) {
            if let Ok(h) = Header::decode(&bytes) {
                let _ = h.validate(fs);
                let _ = h.validate_open(OpenMode::Check);
            }
        }
    }
}
