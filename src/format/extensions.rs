//! Header extensions (cluster 0, after the header).
//!
//! Each extension:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! |      0 |    4 | type (0 = end of list)                  |
//! |      4 |    4 | length of data                          |
//! |      8 |  len | data, then zero padding to 8 bytes      |
//!
//! The list starts at `header_length` and ends at type 0 or at the end area
//! (`backing_file_offset` if set, else the end of cluster 0). An extension that
//! crosses the end is corrupt ("Header extension too large" in QEMU).
//!
//! Feature name table entry (48 bytes): u8 type (0 incompatible, 1 compatible,
//! 2 autoclear), u8 bit number, 46 bytes of NUL-padded name.

use crate::error::{Error, Result};

/// End of the extension list.
pub const QCOW2_EXT_MAGIC_END: u32 = 0;
/// Backing file format name.
pub const QCOW2_EXT_MAGIC_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const QCOW2_EXT_MAGIC_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const QCOW2_EXT_MAGIC_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer (LUKS).
pub const QCOW2_EXT_MAGIC_CRYPTO_HEADER: u32 = 0x0537_be77;
/// External data file name.
pub const QCOW2_EXT_MAGIC_DATA_FILE: u32 = 0x4441_5441;

/// One header extension as found in cluster 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// File offset of the extension's type field.
    pub offset: u64,
    /// The data (without padding).
    pub data: Vec<u8>,
}

/// Parses the extension list in `cluster0[start..end]`. `start` is the header length,
/// `end` the backing file name offset or the cluster size (both already validated
/// to lie inside `cluster0`).
pub fn decode(cluster0: &[u8], start: usize, end: usize) -> Result<Vec<Extension>> {
    let mut out = Vec::new();
    let mut pos = start;
    let end = end.min(cluster0.len());
    // Like QEMU's qcow2_read_extensions: every extension header, the end marker
    // included, must fit before `end` with its declared length.
    while pos < end {
        let data_start = pos + 8;
        let too_large = |len: u32| {
            Error::corrupt(
                "header extension",
                pos as u64,
                format!("extension of {len} bytes crosses the end of the header area ({end:#x})"),
            )
        };
        if data_start > end {
            return Err(too_large(0));
        }
        let kind = u32::from_be_bytes(cluster0[pos..pos + 4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(cluster0[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let data_end = data_start
            .checked_add(len as usize)
            .filter(|e| *e <= end)
            .ok_or_else(|| too_large(len))?;
        if kind == QCOW2_EXT_MAGIC_END {
            break;
        }
        out.push(Extension {
            kind,
            offset: pos as u64,
            data: cluster0[data_start..data_end].to_vec(),
        });
        // Each step advances by at least 8 bytes, so the loop ends.
        pos = data_start + (len as usize).div_ceil(8) * 8;
    }
    Ok(out)
}

/// Appends one extension (with padding) to `out`.
pub fn encode(kind: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (at most 46 bytes).
    pub name: String,
}

/// Size of one feature name table entry.
pub const FEATURE_NAME_ENTRY: usize = 48;

/// Decodes a feature name table.
pub fn decode_feature_names(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_NAME_ENTRY)
        .map(|e| {
            let name = &e[2..];
            let n = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            FeatureName {
                kind: e[0],
                bit: e[1],
                name: String::from_utf8_lossy(&name[..n]).into_owned(),
            }
        })
        .collect()
}

/// Encodes a feature name table.
pub fn encode_feature_names(names: &[FeatureName]) -> Vec<u8> {
    let mut out = Vec::with_capacity(names.len() * FEATURE_NAME_ENTRY);
    for f in names {
        let mut e = [0u8; FEATURE_NAME_ENTRY];
        e[0] = f.kind;
        e[1] = f.bit;
        let n = f.name.len().min(46);
        e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
        out.extend_from_slice(&e);
    }
    out
}

/// The feature name table QEMU writes.
pub fn qemu_feature_names() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn magics_match_the_spec() {
        assert_eq!(QCOW2_EXT_MAGIC_BACKING_FORMAT, 0xE279_2ACA);
        assert_eq!(QCOW2_EXT_MAGIC_FEATURE_TABLE, 0x6803_f857);
        assert_eq!(QCOW2_EXT_MAGIC_BITMAPS, 0x2385_2875);
        assert_eq!(QCOW2_EXT_MAGIC_CRYPTO_HEADER, 0x0537_be77);
        assert_eq!(QCOW2_EXT_MAGIC_DATA_FILE, 0x4441_5441);
    }

    #[test]
    fn extension_crossing_the_end_is_corrupt() {
        let mut c = vec![0u8; 512];
        c[112..116].copy_from_slice(&QCOW2_EXT_MAGIC_BACKING_FORMAT.to_be_bytes());
        c[116..120].copy_from_slice(&1000u32.to_be_bytes());
        let e = decode(&c, 112, 512).unwrap_err();
        assert!(matches!(
            e,
            Error::Corrupt {
                structure: "header extension",
                offset: 112,
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn feature_names_round_trip(names in proptest::collection::vec((0u8..3, 0u8..64, "[a-z ]{0,46}"), 0..10)) {
            let names: Vec<FeatureName> = names.into_iter().map(|(kind, bit, name)| FeatureName { kind, bit, name }).collect();
            prop_assert_eq!(decode_feature_names(&encode_feature_names(&names)), names);
        }

        #[test]
        fn extension_list_round_trips(exts in proptest::collection::vec((1u32.., proptest::collection::vec(any::<u8>(), 0..40)), 0..6)) {
            let mut buf = vec![0u8; 112];
            for (k, d) in &exts { encode(*k, d, &mut buf); }
            buf.extend_from_slice(&[0u8; 8]);
            let end = buf.len();
            let got = decode(&buf, 112, end).unwrap();
            let got: Vec<(u32, Vec<u8>)> = got.into_iter().map(|e| (e.kind, e.data)).collect();
            prop_assert_eq!(got, exts);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), start in 0usize..700, end in 0usize..700) {
            let _ = decode(&bytes, start, end);
        }
    }
}
