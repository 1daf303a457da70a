//! Backing chains: the one opener of a chain of images, for every command that
//! reads one (`convert`, `estimate` and `compare` through [`Source`], `map`
//! layer by layer), and the one place where backing file names are resolved
//! (also for `info`, which does not open the backing file).
//!
//! `open_layers` opens an image and its backing files top down, each layer
//! alone (without its backing source): the top layer's format is probed unless
//! given, a backing file's comes from its overlay's backing-format extension or is
//! probed; pipes, loops (a file already in the chain, by device and inode) and
//! chains deeper than [`MAX_CHAIN_DEPTH`] are refused. `link` attaches each
//! layer to the one below, giving the guest view `convert` reads.
//!
//! Names follow QEMU: a relative backing name is combined with the overlay's name
//! as given ([`path_combine`], no canonicalisation); [`full_backing_filename`] is
//! the name `qemu-img info` reports, [`resolve_backing_name`] the file qdedup opens.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::qcow2::{LayerExtent, Qcow2Source};
use super::raw::RawSource;
use super::{probe, BlockStatus, Format, OpenOptions, Source};
use crate::error::{Error, IoContext, Result};
use crate::format::header;
use crate::image::lock::{lock, LockMode};

/// Deepest backing chain opened (QEMU has no fixed limit; 64 is far beyond any
/// real chain and keeps a crafted one from exhausting file descriptors).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// File offset of the backing_file_offset header field (for error messages).
const BACKING_FILE_OFFSET_FIELD: u64 = header::off::BACKING_FILE_OFFSET as u64;

/// One image of a chain by format, opened alone or (after [`link`]) with the
/// layers below.
pub(crate) enum LayerKind {
    /// A qcow2 layer.
    Qcow2(Box<Qcow2Source>),
    /// A raw file: every byte is present (data or a hole reading as zeros).
    Raw(RawSource),
}

/// One image of a chain with the name QEMU prints for it.
pub(crate) struct Layer {
    /// The path as given (top), or the backing name resolved against its
    /// overlay's name ([`resolve_backing_name`]); the file that was opened.
    pub name: PathBuf,
    /// The image.
    pub kind: LayerKind,
}

impl Layer {
    /// Virtual size of this layer.
    pub fn size(&self) -> u64 {
        self.source().virtual_size()
    }

    /// The layer as a source (reading through the layers below once [`link`]ed).
    pub fn source(&self) -> &dyn Source {
        match &self.kind {
            LayerKind::Qcow2(q) => q.as_ref(),
            LayerKind::Raw(r) => r,
        }
    }

    /// This layer's own answer for `[offset, offset + max_len)`, `offset < size()`,
    /// without looking at the layers below.
    pub fn extent(&self, offset: u64, max_len: u64) -> Result<(LayerExtent, u64)> {
        let max_len = max_len.min(self.size() - offset);
        match &self.kind {
            LayerKind::Qcow2(q) => q.layer_extent(offset, max_len),
            LayerKind::Raw(r) => {
                // file-posix answers DATA or ZERO, always with the offset (raw maps 1:1).
                let (st, len) = r.block_status(offset, max_len)?;
                Ok(match st {
                    BlockStatus::Data => (LayerExtent::Data { host: offset }, len),
                    BlockStatus::Zero => (LayerExtent::Zero { host: Some(offset) }, len),
                })
            }
        }
    }

    fn into_source(self) -> Box<dyn Source> {
        match self.kind {
            LayerKind::Qcow2(q) => q,
            LayerKind::Raw(r) => Box::new(r),
        }
    }
}

/// Files already in the chain, by (device, inode).
#[derive(Default)]
struct Chain {
    seen: Vec<(u64, u64)>,
    /// Take QEMU's `-U` locks instead of its read locks.
    force_share: bool,
}

impl Chain {
    /// Opens `path` (the backing file of `overlay`, if given) and takes QEMU's
    /// read locks on it ([`lock`]), refusing pipes, a file already in the chain,
    /// and chains deeper than [`MAX_CHAIN_DEPTH`].
    fn open_file(&mut self, path: &Path, overlay: Option<&Path>) -> Result<File> {
        let file = File::open(path).ctx(|| match overlay {
            Some(o) => format!(
                "cannot open backing file {} of {}",
                path.display(),
                o.display()
            ),
            None => format!("cannot open {}", path.display()),
        })?;
        let meta = file
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?;
        {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if t.is_fifo() || t.is_socket() {
                return Err(Error::InvalidArgument(format!(
                    "{} is a pipe: images are read at random offsets, so save it to a file first",
                    path.display()
                )));
            }
        }
        let key = (meta.dev(), meta.ino());
        if self.seen.contains(&key) {
            return Err(Error::corrupt(
                "header",
                BACKING_FILE_OFFSET_FIELD,
                format!(
                    "the backing chain loops: {} is already part of it",
                    path.display()
                ),
            ));
        }
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::LimitExceeded(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} images (at {})",
                path.display()
            )));
        }
        self.seen.push(key);
        lock(&file, path, LockMode::read(self.force_share))?;
        Ok(file)
    }

    /// Opens the external data file `name` of the image `image`: resolved like a
    /// backing file name ([`resolve_backing_name`]: a relative name against the
    /// image's directory), with QEMU's read locks.
    fn open_data_file(&mut self, image: &Path, name: &str) -> Result<File> {
        let path = resolve_backing_name(image, name.as_bytes()).map_err(|e| match e {
            Error::Corrupt { detail, .. } => Error::corrupt(
                "data file extension",
                0,
                detail.replace("backing file", "data file"),
            ),
            other => other,
        })?;
        let file = File::open(&path).ctx(|| {
            format!(
                "cannot open the external data file {} of {}",
                path.display(),
                image.display()
            )
        })?;
        lock(&file, &path, LockMode::read(self.force_share))?;
        Ok(file)
    }

    /// Opens `path` and finds its format: `format` if given, else probed.
    fn open_image(
        &mut self,
        path: &Path,
        format: Option<Format>,
        overlay: Option<&Path>,
    ) -> Result<(File, Format)> {
        let file = self.open_file(path, overlay)?;
        let format = match format {
            Some(f) => f,
            None => probe(&file).ctx(|| match overlay {
                Some(_) => format!("cannot read backing file {}", path.display()),
                None => format!("cannot read {}", path.display()),
            })?,
        };
        Ok((file, format))
    }
}

/// Opens the image at `path` alone, as the top of a chain is opened: pipes are
/// refused, the format is `format` or probed, QEMU's read locks are taken (its
/// `-U` ones with `force_share`). For `info`, which describes images without
/// opening their backing file.
pub(crate) fn open_image(
    path: &Path,
    format: Option<Format>,
    force_share: bool,
) -> Result<(File, Format)> {
    Chain {
        force_share,
        ..Chain::default()
    }
    .open_image(path, format, None)
}

/// Opens the image at `path` (format `opts.format`, probed when `None`; the view
/// of snapshot `opts.snapshot`) and, unless `opts.backing_chain` is false, every
/// image of its backing chain, top first, each layer alone. Errors a backing
/// layer raises name its file ([`in_file`]), and so do its later read errors.
pub(crate) fn open_layers(path: &Path, opts: &OpenOptions) -> Result<Vec<Layer>> {
    let mut chain = Chain {
        force_share: opts.force_share,
        ..Chain::default()
    };
    let mut layers = Vec::new();
    let mut next = Some((path.to_path_buf(), opts.format, None::<PathBuf>));
    while let Some((p, fmt, overlay)) = next.take() {
        let (file, fmt) = chain.open_image(&p, fmt, overlay.as_deref())?;
        let label = |e: Error| match overlay {
            Some(_) => in_file(e, &p),
            None => e,
        };
        let kind = match fmt {
            Format::Raw => {
                if let (None, Some(s)) = (&overlay, &opts.snapshot) {
                    return Err(Error::InvalidArgument(format!(
                        "snapshot {s:?} asked for, but {} is a raw image",
                        p.display()
                    )));
                }
                LayerKind::Raw(RawSource::from_file(file, &p).map_err(label)?)
            }
            Format::Qcow2 => {
                // Backing files are read in their active state (no snapshot).
                let snapshot = opts.snapshot.as_deref().filter(|_| overlay.is_none());
                let mut q = Qcow2Source::from_reader(Box::new(file), snapshot).map_err(label)?;
                if overlay.is_some() {
                    q.set_label(&p);
                }
                if let Some(name) = q.data_file_name() {
                    let data = chain.open_data_file(&p, name).map_err(label)?;
                    q.set_data_file(Box::new(data));
                }
                if opts.backing_chain {
                    if let Some((b, bfmt)) = backing_of(&q, &p).map_err(label)? {
                        next = Some((b, bfmt, Some(p.clone())));
                    }
                }
                LayerKind::Qcow2(Box::new(q))
            }
        };
        layers.push(Layer { name: p, kind });
    }
    Ok(layers)
}

/// Attaches each layer to the one below it (the first is the top) and returns the
/// top layer, now reading through the whole chain.
pub(crate) fn link(layers: Vec<Layer>) -> Layer {
    let mut below: Option<Layer> = None;
    for mut layer in layers.into_iter().rev() {
        if let LayerKind::Qcow2(q) = &mut layer.kind {
            q.set_backing(below.take().map(Layer::into_source));
        }
        below = Some(layer);
    }
    below.expect("a chain has a top layer")
}

/// Opens `path` as any supported format (probed unless `opts.format` is set),
/// with its backing chain as `opts` says.
pub(crate) fn open_chain(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Source>> {
    Ok(link(open_layers(path, opts)?).into_source())
}

/// Opens `path` as qcow2 (whatever its magic) with its backing chain.
pub(crate) fn open_qcow2_chain(path: &Path, opts: &OpenOptions) -> Result<Qcow2Source> {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        ..opts.clone()
    };
    match link(open_layers(path, &opts)?).kind {
        LayerKind::Qcow2(q) => Ok(*q),
        LayerKind::Raw(_) => unreachable!("the top layer was opened as qcow2"),
    }
}

/// Names the file an error from a backing layer comes from.
pub(crate) fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Corrupt {
            structure,
            offset,
            detail,
        } => Error::Corrupt {
            structure,
            offset,
            detail: format!("{detail} (in backing file {})", path.display()),
        },
        Error::Unsupported(s) => {
            Error::Unsupported(format!("{s} (in backing file {})", path.display()))
        }
        Error::LimitExceeded(s) => {
            Error::LimitExceeded(format!("{s} (in backing file {})", path.display()))
        }
        other => other,
    }
}

/// The backing file of the layer `q` opened from `path`: the stored name resolved
/// ([`resolve_backing_name`]), and the format its extension names (`None`: probe it).
fn backing_of(q: &Qcow2Source, path: &Path) -> Result<Option<(PathBuf, Option<Format>)>> {
    let Some(name) = q.backing_file() else {
        return Ok(None);
    };
    let bpath = resolve_backing_name(path, name.as_os_str().as_bytes())?;
    let bformat = q
        .backing_format()
        .map(|f| parse_backing_format(f, &bpath))
        .transpose()?;
    Ok(Some((bpath, bformat)))
}

fn parse_backing_format(name: &str, path: &Path) -> Result<Format> {
    match name {
        "qcow2" => Ok(Format::Qcow2),
        // "file" is QEMU's protocol driver: the bytes of the file, i.e. raw.
        "raw" | "file" => Ok(Format::Raw),
        other => Err(Error::Unsupported(format!(
            "backing file format {other:?} (backing file {})",
            path.display()
        ))),
    }
}

/// QEMU's `path_has_protocol`: a `:` before the first `/` (`file:x`, `nbd://h`,
/// `json:{…}`, but not `dir/x:y`).
fn has_protocol(name: &[u8]) -> bool {
    name.iter().find(|b| **b == b':' || **b == b'/') == Some(&b':')
}

/// QEMU's `path_combine` for a local overlay: an absolute `name` as it is, a
/// relative one appended to everything of `overlay` up to and including its last
/// `/` (the overlay's directory as written: no canonicalisation, so `a//top` and
/// `base` give `a//base`, and `top` and `base` give `base`).
pub fn path_combine(overlay: &Path, name: &[u8]) -> PathBuf {
    if name.first() == Some(&b'/') {
        return PathBuf::from(OsStr::from_bytes(name));
    }
    let base = overlay.as_os_str().as_bytes();
    let dir = base
        .iter()
        .rposition(|b| *b == b'/')
        .map_or(&base[..0], |i| &base[..=i]);
    let mut out = dir.to_vec();
    out.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The name `qemu-img info` reports as `full-backing-filename` for the backing
/// name `name` stored in the image opened as `overlay` (QEMU's
/// `bdrv_make_absolute_filename`): a name with a protocol prefix (`file:`, `nbd:`,
/// …) or an absolute one as stored, a relative one combined with the overlay's
/// directory ([`path_combine`]).
pub fn full_backing_filename(overlay: &Path, name: &[u8]) -> PathBuf {
    if has_protocol(name) {
        PathBuf::from(OsStr::from_bytes(name))
    } else {
        path_combine(overlay, name)
    }
}

/// The file qdedup opens for the backing name `name` stored in the image opened as
/// `overlay`: absolute names as they are, relative names combined with the
/// overlay's directory ([`path_combine`]), as QEMU does for plain file names. A
/// `file:` prefix is accepted and the rest resolved the same way (QEMU, which does
/// not combine names with a protocol, opens a relative one from its working
/// directory); other protocols (`nbd:`, `json:`, …) are refused.
pub fn resolve_backing_name(overlay: &Path, name: &[u8]) -> Result<PathBuf> {
    let bad = |d: String| Error::corrupt("header", BACKING_FILE_OFFSET_FIELD, d);
    if name.contains(&0) {
        return Err(bad(format!(
            "backing file name {:?} contains a NUL byte",
            String::from_utf8_lossy(name)
        )));
    }
    let name = name.strip_prefix(b"file:").unwrap_or(name);
    if name.is_empty() {
        return Err(bad("the backing file name is empty".into()));
    }
    if has_protocol(name) {
        let i = name.iter().position(|b| *b == b':').unwrap_or(name.len());
        return Err(Error::Unsupported(format!(
            "backing file protocol {:?} (backing file {:?}); only local files are read",
            String::from_utf8_lossy(&name[..i]),
            String::from_utf8_lossy(name)
        )));
    }
    Ok(path_combine(overlay, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_overlay_directory() {
        let r = |o: &str, n: &str| resolve_backing_name(Path::new(o), n.as_bytes());
        assert_eq!(
            r("/a/b/top.qcow2", "base.qcow2").unwrap(),
            Path::new("/a/b/base.qcow2")
        );
        assert_eq!(
            r("/a/b/top.qcow2", "../c/base").unwrap(),
            Path::new("/a/b/../c/base")
        );
        assert_eq!(
            r("top.qcow2", "base.qcow2").unwrap(),
            Path::new("base.qcow2")
        );
        assert_eq!(r("/a/top", "/abs/base").unwrap(), Path::new("/abs/base"));
        assert_eq!(r("/a/top", "file:base").unwrap(), Path::new("/a/base"));
        assert_eq!(r("/a/top", "dir/x:y").unwrap(), Path::new("/a/dir/x:y"));
    }

    #[test]
    fn protocols_and_bad_names_are_refused() {
        let r = |n: &[u8]| resolve_backing_name(Path::new("/a/top"), n);
        assert!(matches!(r(b"nbd://host/x"), Err(Error::Unsupported(_))));
        assert!(matches!(r(b"json:{}"), Err(Error::Unsupported(_))));
        assert!(matches!(r(b"a\0b"), Err(Error::Corrupt { .. })));
        assert!(matches!(r(b"file:"), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn names_combine_byte_for_byte_like_qemu() {
        // What qemu-img info prints as full-backing-filename for these overlays
        // and stored names (QEMU 10).
        let f = |o: &str, n: &str| full_backing_filename(Path::new(o), n.as_bytes());
        for (overlay, name, full) in [
            ("a/t1.qcow2", "../b/base.raw", "a/../b/base.raw"),
            ("./a/t1.qcow2", "../b/base.raw", "./a/../b/base.raw"),
            ("a//t1.qcow2", "../b/base.raw", "a//../b/base.raw"),
            ("a/./t1.qcow2", "../b/base.raw", "a/./../b/base.raw"),
            ("t5.qcow2", "base.raw", "base.raw"),
            ("a/t9.qcow2", "./x//y", "a/./x//y"),
            ("a/t8.qcow2", "dir/x:y", "a/dir/x:y"),
            ("a/t4.qcow2", "/tmp/b/base.raw", "/tmp/b/base.raw"),
            ("a/t2.qcow2", "file:../b/base.raw", "file:../b/base.raw"),
            ("a/t7.qcow2", "nbd://x/y", "nbd://x/y"),
            ("a/t11.qcow2", ":x", ":x"),
            ("a/t12.qcow2", "/abs:x", "/abs:x"),
        ] {
            assert_eq!(f(overlay, name), Path::new(full), "{overlay} + {name}");
        }
    }
}
