//! qdedup converts disk images (raw, qcow2) into compact qcow2 v3 images in which
//! identical clusters are stored once, and verifies such images.
#![deny(missing_docs)]

pub mod check;
pub mod error;
pub mod format;
pub mod image;
pub mod io;
pub mod source;

pub use error::{Error, Result};
pub mod compress;
pub mod convert;
pub mod dedup;
pub mod inspect;
pub mod oracle;
pub mod sample;
