//! Block I/O for ublk-thin.
//!
//! `meta`: the 4 KiB metadata block devices the metadata crate is written against (a file, a
//! memory image, and a fault-injecting wrapper that can produce crash images).
//!
//! Invariants: a device never returns a partially filled buffer as success; every size or
//! range problem is an `io::Error` with a message, never a panic.

pub mod meta;

pub use meta::{
    os_error, CrashConfig, Fault, FaultyMetaDevice, FileMetaDevice, MemMetaDevice, MetaBlock,
    MetaDevice, META_BLOCK_SIZE,
};
