//! Opening an image for checking: the header, its extensions and the backing file
//! name, validated before anything else is read. This refuses what QEMU refuses to
//! open (then there is nothing to check); everything past this point becomes a
//! finding instead of an error.

use crate::error::{Error, IoContext, Result};
use crate::format::extensions::{self, Extension};
use crate::format::header::{
    CompressionType, Header, QCOW2_INCOMPAT_COMPRESSION, QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_MASK,
};
use crate::io::ReadAt;

/// Header fields and derived geometry of an image under check.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub header: Header,
    pub file_len: u64,
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub extended_l2: bool,
    pub l2_entry_size: u64,
    pub l2_entries: u64,
    pub data_file: bool,
    pub compression: CompressionType,
    pub backing_file: Option<String>,
    pub extensions: Vec<Extension>,
}

impl Image {
    /// Reads and validates the header and its extensions.
    pub fn open<R: ReadAt + ?Sized>(img: &R) -> Result<Self> {
        let file_len = img.len().ctx(|| "reading the image size".into())?;
        let mut first = vec![0u8; Header::ENCODED_LEN];
        let n = img
            .read_at_zero_fill(&mut first, 0)
            .ctx(|| "reading the header".into())?;
        let header = Header::decode(&first[..n])?;
        // QEMU opens an image whose tables run past the end of the file (it reads
        // zeros there); the walk reports them as corruptions.
        header.validate_with(None)?;
        if header.crypt_method > 2 {
            return Err(Error::Unsupported(format!(
                "encryption method {}",
                header.crypt_method
            )));
        }
        let unknown = header.incompatible_features & !QCOW2_INCOMPAT_MASK;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        let bit = header.incompatible_features & QCOW2_INCOMPAT_COMPRESSION != 0;
        if bit != (header.compression_type != 0) {
            return Err(Error::corrupt(
                "header",
                104,
                format!(
                    "compression_type {} does not match incompatible feature bit 3",
                    header.compression_type
                ),
            ));
        }
        let compression = header.compression()?;
        let cluster_size = header.cluster_size();
        // validate() bounds cluster_bits to 9..=21, so this is at most 2 MiB.
        let mut cluster0 = vec![0u8; cluster_size as usize];
        img.read_at_zero_fill(&mut cluster0, 0)
            .ctx(|| "reading cluster 0".into())?;
        // validate() checked backing_file_offset ≤ cluster size and header_length ≤
        // cluster size (v3); the v2 header is 72 bytes.
        let start = header.header_length as usize;
        let end = if header.backing_file_offset != 0 {
            header.backing_file_offset as usize
        } else {
            cluster0.len()
        };
        let extensions = extensions::decode(&cluster0, start, end)?;
        let backing_file = (header.backing_file_offset != 0).then(|| {
            let from = header.backing_file_offset as usize;
            let to = (from + header.backing_file_size as usize).min(cluster0.len());
            String::from_utf8_lossy(&cluster0[from..to]).into_owned()
        });
        let extended_l2 = header.extended_l2();
        Ok(Image {
            file_len,
            cluster_bits: header.cluster_bits,
            cluster_size,
            extended_l2,
            l2_entry_size: header.l2_entry_size(),
            l2_entries: header.l2_entries(),
            data_file: header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE != 0,
            compression,
            backing_file,
            extensions,
            header,
        })
    }

    /// The first extension of type `kind`.
    pub fn extension(&self, kind: u32) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.kind == kind)
    }
}
