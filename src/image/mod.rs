//! Existing qcow2 images: the pieces every command that reads or changes an
//! image shares (stored refcounts today; tables, the walker and the chain opener
//! as they move here).

pub mod refcounts;
