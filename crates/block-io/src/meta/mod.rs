//! Metadata block devices: whole 4 KiB blocks, addressed by block number.
//!
//! The metadata crate needs only read, write and flush of aligned 4 KiB blocks. Writes are
//! volatile until `flush` returns: a crash may keep any subset of unflushed writes, and may
//! tear each of them at 512-byte sector granularity (see `fault`). Nothing here caches.

use std::{fmt, io};

mod fault;
mod file;
mod memory;

pub use fault::{CrashConfig, Fault, FaultyMetaDevice};
pub use file::FileMetaDevice;
pub use memory::MemMetaDevice;

/// Size of one metadata block in bytes (dm-thin's metadata block size, 8 sectors).
pub const META_BLOCK_SIZE: usize = 4096;

/// One metadata block.
pub type MetaBlock = [u8; META_BLOCK_SIZE];

/// A device of 4 KiB metadata blocks.
pub trait MetaDevice: Send + Sync + std::fmt::Debug {
    /// Number of whole 4 KiB blocks the device holds now (it may grow).
    fn nr_blocks(&self) -> u64;

    /// Reads block `block` into `buf`. A block past the end is an error.
    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()>;

    /// Writes `buf` to block `block`. Volatile until `flush`.
    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()>;

    /// Writes several blocks. Implementations may coalesce adjacent blocks into one I/O; the
    /// order in which the blocks reach stable storage is unspecified until `flush`.
    fn write_blocks(&self, blocks: &[(u64, &MetaBlock)]) -> io::Result<()> {
        for (block, buf) in blocks {
            self.write_block(*block, buf)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// The error for an access past the end of a device.
pub(crate) fn out_of_range(block: u64, nr_blocks: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("metadata block {block} is past the end of the device ({nr_blocks} blocks)"),
    )
}

/// An I/O error together with what was being done. The original error stays as the source,
/// so the errno a frontend must report is still reachable through `os_error`.
#[derive(Debug)]
struct Context {
    what: String,
    source: io::Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Wraps `source` with a description of the failed operation, keeping its kind.
pub(crate) fn annotate(source: io::Error, what: impl Into<String>) -> io::Error {
    io::Error::new(
        source.kind(),
        Context {
            what: what.into(),
            source,
        },
    )
}

/// The OS error number behind `e`, looking through the context the devices here add.
///
/// Devices wrap OS errors to say which block and path failed, which hides
/// `io::Error::raw_os_error`; a frontend that must report an errno calls this instead.
pub fn os_error(e: &io::Error) -> Option<i32> {
    // Bounded because a chain of contexts is only ever one or two deep here.
    const MAX_DEPTH: usize = 8;
    let mut cur = e;
    for _ in 0..MAX_DEPTH {
        if let Some(errno) = cur.raw_os_error() {
            return Some(errno);
        }
        cur = &cur.get_ref()?.downcast_ref::<Context>()?.source;
    }
    None
}
