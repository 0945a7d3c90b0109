//! Block I/O for ublk-thin.
//!
//! `meta`: the 4 KiB metadata block devices the metadata crate is written against (a file, a
//! memory image, and a fault-injecting wrapper that can produce crash images).
//!
//! `data`: the data device the pool engine reads and writes user data through, in pool data
//! blocks: an io_uring O_DIRECT engine that submits on the current thread's ring (block-io's
//! own standalone ring, or a ublk queue's through `data::rt::RingSubmitter`), a synchronous
//! fallback, and memory and fault-injecting devices, all behind `data::DataDevice`.
//!
//! Invariants: a device never returns a partially filled buffer as success; every size or
//! range problem is an `io::Error` with a message, never a panic.

mod blkdev;
pub use blkdev::device_size_bytes;
pub mod data;
pub mod meta;

pub use meta::{
    os_error, CrashConfig, Fault, FaultyMetaDevice, FileMetaDevice, MemMetaDevice, MetaBlock,
    MetaDevice, META_BLOCK_SIZE,
};
