//! The library's one error type.
//!
//! Errors are split into classes a caller can act on: I/O failures, corrupt input
//! (naming the on-disk structure and its file offset), features qdedup does not
//! support, limits exceeded, and invalid arguments from the caller.

use std::io;

/// Everything that can go wrong in qdedup's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The input is corrupt: a structure read from the file breaks the qcow2 rules.
    #[error("corrupt {structure} at offset {offset:#x}: {detail}")]
    Corrupt {
        /// The on-disk structure, e.g. "L1 table" or "header".
        structure: &'static str,
        /// File offset of the structure (or field) in the image.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The input uses a feature qdedup does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A size or count exceeds a limit qdedup (or QEMU) enforces.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The caller passed an invalid argument or option.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another process has the image open in a way this use conflicts with:
    /// QEMU's image locks (see [`crate::image::lock`]). Nothing was written.
    #[error("Failed to get {lock} lock on {path}: {holder}")]
    Locked {
        /// The image.
        path: String,
        /// The lock, as QEMU names it: `"write"`, `shared "write"`, …
        lock: String,
        /// Who holds the image, as far as can be told, and what to do.
        holder: String,
    },
    /// The operation was interrupted (e.g. by Ctrl-C) and cleaned up after itself.
    #[error("interrupted")]
    Interrupted,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds an [`Error::Corrupt`].
    pub fn corrupt(structure: &'static str, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            structure,
            offset,
            detail: detail.into(),
        }
    }
}

/// Adds context to `io::Result`s.
pub trait IoContext<T> {
    /// Converts an I/O error into [`Error::Io`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
