//! On-disk structures of qcow2, one module each. Pure encode/decode, no I/O.

pub mod compressed;
pub mod extensions;
pub mod header;
pub mod l1l2;
pub mod refcount;
pub mod snapshot;
