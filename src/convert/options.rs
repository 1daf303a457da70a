//! Options of `convert`, and qemu-img's `-o key=value,...` syntax.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::header::{CompressionType, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::source::{Format, OpenOptions};

/// Called with (guest bytes done, guest bytes total).
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// Options of a conversion.
#[derive(Clone)]
pub struct ConvertOptions {
    /// How [`convert`](super::convert) opens the input (format probed by default,
    /// through the backing chain, the active layer).
    pub input: OpenOptions,
    /// log2 of the output cluster size (9..=21); default 16 (64 KiB).
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6); default 4 (16 bits).
    pub refcount_order: u32,
    /// Share identical clusters (default true).
    pub dedup: bool,
    /// Compress clusters with this codec.
    pub compression: Option<CompressionType>,
    /// Compression level (codec default if `None`).
    pub compression_level: Option<i32>,
    /// Skip deflate on contents the incompressibility probe judges incompressible
    /// (default true; see [`crate::compress::looks_incompressible`]).
    pub compress_probe: bool,
    /// Hash/compress worker threads; 0 = the sequential reference converter.
    pub workers: usize,
    /// Bytes of guest data in flight in the pipeline (default 64 MiB).
    pub max_in_flight: usize,
    /// fsync the output before renaming it into place (default true).
    pub sync: bool,
    /// Replace an existing output file.
    pub force: bool,
    /// Called with (guest bytes done, guest bytes total) as the conversion
    /// advances (the command line draws its progress bar with it).
    pub progress: Option<Arc<ProgressFn>>,
    /// Set from outside (e.g. a Ctrl-C handler) to stop the conversion: it then
    /// fails with [`Error::Interrupted`] and leaves no output behind.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Write an overlay on this backing file (qemu-img's `-B`/`-b`, `-o
    /// backing_file=`): the name is stored as given; a relative name is opened
    /// relative to the output's directory, as QEMU does. Clusters equal to the
    /// backing chain's content stay unallocated (see [`mod@crate::convert`]).
    pub backing_file: Option<std::path::PathBuf>,
    /// Format of the backing file (qemu-img's `-F`, `-o backing_fmt=`); probed
    /// when `None`.
    pub backing_format: Option<Format>,
    /// qcow2 version of the output: 3 (`compat=1.1`, the default) or 2
    /// (`compat=0.10`: no zero flag, 16-bit refcounts, zlib only).
    pub qcow2_version: u32,
    /// qemu-img's `-S`: `Some(0)` stores every cluster, zero clusters included
    /// (with dedup they share one host cluster); other values up to the cluster
    /// size change nothing (qdedup decides per cluster); larger ones are refused
    /// ([`ConvertOptions::validate`]).
    pub sparse_size: Option<u64>,
    /// qemu-img's `--salvage`: what cannot be read from the input (a read error,
    /// a qcow2 table or cluster past the end of a truncated file, a broken
    /// compressed stream) is converted as zeros and listed in the report,
    /// instead of failing the conversion.
    pub salvage: bool,
    /// Also compute the blkhash digest of the input's guest content with this
    /// hash function (`convert --checksum`; see [`crate::checksum`](mod@crate::checksum)).
    pub checksum: Option<crate::checksum::Algorithm>,
    /// Compare bytes before sharing a copy the dedup index found (read back
    /// from the output; default false: a match is trusted on 96 bits of BLAKE3).
    pub verify: bool,
    /// Write the data of the pipelined converter with direct I/O (`O_DIRECT`,
    /// bypassing the page cache) where the output allows it (default false, as
    /// the CLI's without `--direct` or `-t none`): a third to a half less CPU
    /// time, but each write waits for the device, one at a time. Through the
    /// page cache a synced conversion starts the writeback of its output as it
    /// goes (write-behind), which on this project's benchmark VM ended 20–40%
    /// sooner than direct I/O (docs/benchmarks.md, issue 19); an unsynced one
    /// ends once the data is in the page cache. The output's bytes are the
    /// same either way.
    pub direct_io: bool,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("input", &self.input)
            .field("cluster_bits", &self.cluster_bits)
            .field("refcount_order", &self.refcount_order)
            .field("dedup", &self.dedup)
            .field("compression", &self.compression)
            .field("compress_probe", &self.compress_probe)
            .field("workers", &self.workers)
            .field("max_in_flight", &self.max_in_flight)
            .field("sync", &self.sync)
            .field("force", &self.force)
            .field("backing_file", &self.backing_file)
            .field("backing_format", &self.backing_format)
            .field("qcow2_version", &self.qcow2_version)
            .field("sparse_size", &self.sparse_size)
            .field("salvage", &self.salvage)
            .field("checksum", &self.checksum)
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            input: OpenOptions::default(),
            cluster_bits: 16,
            refcount_order: 4,
            dedup: true,
            compression: None,
            compression_level: None,
            compress_probe: true,
            workers: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            max_in_flight: 64 << 20,
            sync: true,
            force: false,
            progress: None,
            cancel: None,
            backing_file: None,
            backing_format: None,
            qcow2_version: 3,
            sparse_size: None,
            salvage: false,
            checksum: None,
            verify: false,
            direct_io: false,
        }
    }
}

/// Parses a size like `65536`, `64k`, `64K`, `2M`, `2m`, `1G`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'b' => 1u64,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(Error::InvalidArgument(format!("bad size suffix in '{s}'"))),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("bad size '{s}'")))?;
    n.checked_mul(mult)
        .ok_or_else(|| Error::InvalidArgument(format!("size '{s}' too large")))
}

/// The `-o` options `convert` and `estimate` accept, with a one-line description
/// each (printed by `-o help`).
pub const O_OPTIONS: &[(&str, &str)] = &[
    (
        "cluster_size",
        "qcow2 cluster size, a power of two from 512 to 2M (default 64k)",
    ),
    (
        "refcount_bits",
        "refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (default 16)",
    ),
    ("compression_type", "codec for -c: zlib (default) or zstd"),
    (
        "compat",
        "1.1 (qcow2 v3, default) or 0.10 (v2: zero clusters over a backing file stored as data, 16-bit refcounts, zlib only)",
    ),
    (
        "lazy_refcounts",
        "off only; accepted for qemu-img compatibility",
    ),
    (
        "extended_l2",
        "off only; accepted for qemu-img compatibility",
    ),
    ("preallocation", "off only; zero clusters are never stored"),
    (
        "backing_file",
        "write an overlay on this backing file (as -B); stored as given",
    ),
    ("backing_fmt", "format of the backing file: raw or qcow2 (as -F)"),
];

impl ConvertOptions {
    /// Applies qemu-img style `-o` options: `cluster_size=64k,refcount_bits=16,
    /// compression_type=zstd`. Several `-o` may be given.
    pub fn apply_o(&mut self, spec: &str) -> Result<()> {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!("option '{item}' is not key=value"))
            })?;
            match k.trim() {
                "cluster_size" => {
                    let cs = parse_size(v)?;
                    if !cs.is_power_of_two()
                        || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
                    {
                        return Err(Error::InvalidArgument(format!(
                            "cluster_size must be a power of two between 512 and 2M, not {v}"
                        )));
                    }
                    self.cluster_bits = cs.trailing_zeros();
                }
                "refcount_bits" => {
                    let b: u32 = v
                        .parse()
                        .map_err(|_| Error::InvalidArgument(format!("bad refcount_bits '{v}'")))?;
                    if !b.is_power_of_two() || b > 64 {
                        return Err(Error::InvalidArgument(format!(
                            "refcount_bits must be a power of two between 1 and 64, not {v}"
                        )));
                    }
                    self.refcount_order = b.trailing_zeros();
                }
                "compression_type" => {
                    self.compression = Some(match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "compression_type must be zlib or zstd, not {v}"
                            )))
                        }
                    });
                }
                // Accepted for qemu-img compatibility where the value is what
                // qdedup writes anyway; anything else is refused with the reason.
                "compat" => match v {
                    "1.1" | "v3" => self.qcow2_version = 3,
                    "0.10" | "v2" => self.qcow2_version = 2,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "compat must be 1.1 (v3) or 0.10 (v2), not {v}"
                        )))
                    }
                },
                "backing_file" => {
                    if v.is_empty() {
                        return Err(Error::InvalidArgument(
                            "backing_file needs a file name".into(),
                        ));
                    }
                    self.backing_file = Some(v.into());
                }
                "backing_fmt" => self.backing_format = Some(v.parse()?),
                "lazy_refcounts" | "extended_l2" | "preallocation" => {
                    let k = k.trim();
                    if !matches!(v, "off" | "false") {
                        return Err(Error::InvalidArgument(format!(
                            "{k}={v} is not supported: qdedup writes images with {k}=off"
                        )));
                    }
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown option '{other}' (known: {})",
                        O_OPTIONS
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Checks the options against each other, as QEMU does for the same
    /// combination: version 2 has 16-bit refcounts and zlib only; `-S` is at most
    /// the cluster size; a backing format needs a backing file.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.qcow2_version, 2 | 3) {
            return Err(Error::InvalidArgument(format!(
                "qcow2 version {} (qdedup writes 2 or 3)",
                self.qcow2_version
            )));
        }
        if self.qcow2_version == 2 {
            if self.refcount_order != 4 {
                return Err(Error::InvalidArgument(format!(
                    "refcount_bits={} needs compat=1.1: version 2 images have 16-bit refcounts \
                     (as qemu-img: different refcount widths than 16 bits require \
                     compatibility level 1.1 or above)",
                    1u32 << self.refcount_order
                )));
            }
            if self.compression == Some(CompressionType::Zstd) {
                return Err(Error::InvalidArgument(
                    "compression_type=zstd needs compat=1.1: version 2 images know only zlib \
                     (as qemu-img: compression_type requires compat=1.1 or above)"
                        .into(),
                ));
            }
        }
        if let Some(s) = self.sparse_size {
            if s % 512 != 0 || s > self.cluster_size() {
                return Err(Error::InvalidArgument(format!(
                    "-S {s}: qdedup decides per cluster whether it is all zeros, so it takes \
                     0 (store every cluster) or a multiple of 512 up to the cluster size ({}); \
                     a larger sparse size would have to store zero clusters inside data runs",
                    self.cluster_size()
                )));
            }
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return Err(Error::InvalidArgument(
                "a backing format (-F, backing_fmt) needs a backing file (-B, -b, backing_file)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_style_options_parse() {
        let mut o = ConvertOptions::default();
        o.apply_o("cluster_size=4k,refcount_bits=2").unwrap();
        assert_eq!((o.cluster_bits, o.refcount_order), (12, 1));
        o.apply_o("cluster_size=2M").unwrap();
        assert_eq!(o.cluster_bits, 21);
        assert!(o.apply_o("cluster_size=3000").is_err());
        assert!(o.apply_o("cluster_size=4M").is_err());
        assert!(o.apply_o("refcount_bits=3").is_err());
        assert!(o.apply_o("refcount_bits=128").is_err());
        assert!(o.apply_o("bogus=1").is_err());
        o.apply_o("compat=1.1,lazy_refcounts=off,extended_l2=off,preallocation=off")
            .unwrap();
        assert_eq!((o.cluster_bits, o.refcount_order), (21, 1), "no-ops");
        for bad in ["compat=2", "lazy_refcounts=on", "extended_l2=on"] {
            let e = o.apply_o(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split('=').next().unwrap()), "{e}");
        }
        let mut v2 = ConvertOptions::default();
        v2.apply_o("compat=0.10,backing_file=b.raw,backing_fmt=raw")
            .unwrap();
        assert_eq!(v2.qcow2_version, 2);
        assert_eq!(v2.backing_format, Some(Format::Raw));
        v2.validate().unwrap();
        let mut bad = v2.clone();
        bad.refcount_order = 3;
        assert!(bad.validate().is_err(), "v2 has 16-bit refcounts");
        let mut bad = v2.clone();
        bad.compression = Some(CompressionType::Zstd);
        assert!(bad.validate().is_err(), "v2 has no zstd");
        for (s, ok) in [
            (0, true),
            (4096, true),
            (65536, true),
            (1000, false),
            (1 << 17, false),
        ] {
            let o = ConvertOptions {
                sparse_size: Some(s),
                ..ConvertOptions::default()
            };
            assert_eq!(o.validate().is_ok(), ok, "-S {s}");
        }
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
    }
}
