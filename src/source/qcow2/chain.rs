//! Backing chains: resolving backing file names, choosing their format, and
//! opening the chain with a depth limit and loop detection.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::Qcow2Source;
use crate::error::{Error, IoContext, Result};
use crate::format::header;
use crate::source::raw::RawSource;
use crate::source::{probe, Format, OpenOptions, Source};

/// Deepest backing chain opened (QEMU has no fixed limit; 64 is far beyond any
/// real chain and keeps a crafted one from exhausting file descriptors).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// File offset of the backing_file_offset header field (for error messages).
const BACKING_FILE_OFFSET_FIELD: u64 = header::off::BACKING_FILE_OFFSET as u64;

/// Files already in the chain, by (device, inode).
#[derive(Default)]
pub(crate) struct Chain {
    seen: Vec<(u64, u64)>,
}

impl Chain {
    /// Opens `path` (the backing file of `overlay`, if given), refusing pipes, a
    /// file already in the chain, and chains deeper than [`MAX_CHAIN_DEPTH`].
    pub(crate) fn open_file(&mut self, path: &Path, overlay: Option<&Path>) -> Result<File> {
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
        Ok(file)
    }
}

/// Opens `path` as any supported format (probed unless `opts.format` is set),
/// with its backing chain as `opts` says.
pub(crate) fn open_chain(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Source>> {
    let mut chain = Chain::default();
    let file = chain.open_file(path, None)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe(&file).ctx(|| format!("cannot read {}", path.display()))?,
    };
    match format {
        Format::Raw => {
            if let Some(s) = &opts.snapshot {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {s:?} asked for, but {} is a raw image",
                    path.display()
                )));
            }
            Ok(Box::new(RawSource::from_file(file, path)?))
        }
        Format::Qcow2 => Ok(Box::new(open_qcow2(file, path, opts, &mut chain)?)),
    }
}

/// Opens `path` as qcow2 (whatever its magic) with its backing chain.
pub(crate) fn open_qcow2_chain(path: &Path, opts: &OpenOptions) -> Result<Qcow2Source> {
    let mut chain = Chain::default();
    let file = chain.open_file(path, None)?;
    open_qcow2(file, path, opts, &mut chain)
}

fn open_qcow2(
    file: File,
    path: &Path,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Qcow2Source> {
    let mut q = Qcow2Source::from_reader(Box::new(file), opts.snapshot.as_deref())?;
    if !opts.backing_chain {
        return Ok(q);
    }
    let Some((bpath, bformat)) = backing_of(&q, path)? else {
        return Ok(q);
    };
    let backing = open_backing(&bpath, bformat, path, chain)?;
    q.set_backing(Some(backing));
    Ok(q)
}

fn open_backing(
    path: &Path,
    format: Option<Format>,
    overlay: &Path,
    chain: &mut Chain,
) -> Result<Box<dyn Source>> {
    let file = chain.open_file(path, Some(overlay))?;
    let format = match format {
        Some(f) => f,
        None => probe(&file).ctx(|| format!("cannot read backing file {}", path.display()))?,
    };
    match format {
        Format::Raw => Ok(Box::new(
            RawSource::from_file(file, path).map_err(|e| in_file(e, path))?,
        )),
        Format::Qcow2 => {
            // Backing files are read in their active state (no snapshot).
            let mut q =
                Qcow2Source::from_reader(Box::new(file), None).map_err(|e| in_file(e, path))?;
            q.set_label(path);
            if let Some((bpath, bformat)) = backing_of(&q, path).map_err(|e| in_file(e, path))? {
                let b = open_backing(&bpath, bformat, path, chain)?;
                q.set_backing(Some(b));
            }
            Ok(Box::new(q))
        }
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

/// The backing file of the layer `q` opened from `path`, as every command finds
/// it: the stored name resolved as QEMU resolves it ([`resolve_backing_name`]),
/// and the format its extension names (`None`: probe it).
pub(crate) fn backing_of(
    q: &Qcow2Source,
    path: &Path,
) -> Result<Option<(PathBuf, Option<Format>)>> {
    let Some(name) = q.backing_name.as_deref() else {
        return Ok(None);
    };
    let bpath = resolve_backing_name(path, name)?;
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

/// Resolves a backing file name the way QEMU does for plain file names: absolute
/// names as they are, relative names against the overlay's directory. A `file:`
/// prefix is accepted; other protocols (`nbd:`, `json:`, …) are refused.
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
    // QEMU's path_has_protocol: a ':' before the first '/'.
    if let Some(i) = name.iter().position(|b| *b == b':' || *b == b'/') {
        if name[i] == b':' {
            return Err(Error::Unsupported(format!(
                "backing file protocol {:?} (backing file {:?}); only local files are read",
                String::from_utf8_lossy(&name[..i]),
                String::from_utf8_lossy(name)
            )));
        }
    }
    let p = Path::new(OsStr::from_bytes(name));
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    })
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
}
