//! The data device: what the pool engine reads and writes user data through, in pool data
//! blocks.
//!
//! One trait, `DataDevice`, and its engines:
//! - `UringDataDevice`: io_uring with O_DIRECT on the current thread's ring, either block-io's
//!   standalone per-thread ring (`StandaloneRing`, driven by `rt::block_on`) or an external one
//!   such as a ublk queue's (through `RingSubmitter`);
//! - `SyncDataDevice`: pread/pwrite, inline or on a small bounded thread pool, the fallback
//!   when io_uring cannot be set up;
//! - `MemDataDevice` and `FaultyDataDevice`: in memory, for models and crash tests.
//!
//! `open::DataDeviceOptions` opens a file with the best engine that works and says, in one
//! warning line, why it fell back. The same conformance suite runs against every engine.
//!
//! Semantics shared by all engines:
//! - An I/O addresses `(block, offset_bytes, len)` inside one data block. `offset_bytes` and
//!   `len` must be multiples of `align_bytes` (O_DIRECT), and the range must lie inside the
//!   block and the block inside the device; anything else is an `InvalidInput` error with a
//!   message, never a partial I/O. A zero-length I/O is a no-op.
//! - Buffers are owned `IoBuf`s passed by value and handed back with the result, so no caller
//!   can touch memory the kernel may be writing. Dropping a future with I/O in flight is safe:
//!   the memory lives until the completion arrives.
//! - Writes are volatile until `flush` returns; `flush` makes every write that completed
//!   before it was called durable. Concurrent writes to the same bytes land in an unspecified
//!   order.
//! - `discard_blocks` is a hint passed down to the device: afterwards the blocks read back as
//!   zeros or as their old content (on a regular file with the default policy: zeros).
//!   `zero_blocks` guarantees zeros. Both report the primitive they used.

use std::fmt;
use std::io;

mod buf;
mod fault;
mod file;
mod limits;
mod memory;
mod open;
pub mod rt;
mod sync;
mod uring;

pub use buf::{IoBuf, IO_BUF_ALIGN, MAX_IO_BUF_BYTES};
pub use fault::{DataFault, DataOp, FaultyDataDevice};
pub use file::{DataFile, DirectIo, FileKind, Prealloc};
pub use limits::{LimiterStats, Limits};
pub use memory::MemDataDevice;
pub use open::{AnyDataDevice, DataDeviceOptions, EngineChoice, EngineKind};
pub use sync::{SyncDataDevice, SyncMode};
pub use uring::UringDataDevice;

/// A pool data block number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataBlock(pub u64);

impl fmt::Display for DataBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "data block {}", self.0)
    }
}

/// An operation's result together with the buffer it used.
pub type BufResult<T> = (io::Result<T>, IoBuf);

/// A vectored operation's result together with its buffers.
pub type BufsResult = (io::Result<()>, Vec<IoBuf>);

/// Most buffers one vectored I/O takes (well under the kernel's IOV_MAX of 1024).
pub const MAX_IOVECS: usize = 64;

/// Largest data block: dm-thin's limit, 1 GiB.
pub const MAX_BLOCK_SIZE_BYTES: u64 = 1 << 30;

/// Which primitive a zero or discard used, cheapest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Primitive {
    /// `fallocate(FALLOC_FL_ZERO_RANGE)`: no data written, allocation kept.
    FallocZeroRange,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)`: space returned to the filesystem.
    FallocPunchHole,
    /// `BLKZEROOUT` (the device may use WRITE ZEROES or unmap).
    BlkZeroOut,
    /// `BLKDISCARD`.
    BlkDiscard,
    /// Zero buffers written over the range: the fallback that always works.
    WriteZeroes,
    /// An in-memory device changed its bytes.
    Memory,
    /// Nothing was done (a discard under `DiscardPolicy::Ignore`, or unsupported by the device).
    Ignored,
}

/// What `discard_blocks` does on a regular file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardPolicy {
    /// Punch a hole: the filesystem gets the space back, but the next write into the block
    /// allocates again (and stalls, seed 002). The default, since returning space is the
    /// point of passdown.
    #[default]
    PunchHole,
    /// Zero the range but keep its allocation: no space returned, no later stall.
    ZeroRange,
    /// Do nothing.
    Ignore,
}

/// Block size, block count and I/O alignment of a data device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataGeometry {
    /// Bytes per data block: a multiple of `align_bytes`, at most 1 GiB.
    pub block_size_bytes: u64,
    /// Whole data blocks on the device.
    pub nr_blocks: u64,
    /// Offsets and lengths must be multiples of this (512..=4096, a power of two).
    pub align_bytes: u64,
}

impl DataGeometry {
    /// Checks the relations above.
    pub fn new(block_size_bytes: u64, nr_blocks: u64, align_bytes: u64) -> io::Result<Self> {
        let ok_align = align_bytes.is_power_of_two() && (512..=4096).contains(&align_bytes);
        if !ok_align
            || block_size_bytes == 0
            || block_size_bytes > MAX_BLOCK_SIZE_BYTES
            || !block_size_bytes.is_multiple_of(align_bytes)
        {
            return Err(invalid(format!(
                "data block size {block_size_bytes} must be a non-zero multiple of the \
                 {align_bytes}-byte I/O alignment (a power of two in 512..=4096) and at most \
                 {MAX_BLOCK_SIZE_BYTES}"
            )));
        }
        if nr_blocks.checked_mul(block_size_bytes).is_none() {
            return Err(invalid(format!(
                "{nr_blocks} data blocks of {block_size_bytes} bytes overflow a device size"
            )));
        }
        Ok(Self {
            block_size_bytes,
            nr_blocks,
            align_bytes,
        })
    }

    /// Bytes the device holds.
    pub fn len_bytes(&self) -> u64 {
        self.nr_blocks * self.block_size_bytes
    }

    /// Checks an I/O of `len` bytes at `offset_bytes` in `block`; returns its device offset.
    pub fn check_io(&self, block: DataBlock, offset_bytes: u64, len: u64) -> io::Result<u64> {
        self.check_block(block)?;
        let end = offset_bytes.checked_add(len);
        if end.is_none_or(|end| end > self.block_size_bytes) {
            return Err(invalid(format!(
                "bytes {offset_bytes}..+{len} cross the end of {block} ({} bytes)",
                self.block_size_bytes
            )));
        }
        if !offset_bytes.is_multiple_of(self.align_bytes) || !len.is_multiple_of(self.align_bytes) {
            return Err(invalid(format!(
                "I/O at offset {offset_bytes} of {len} bytes in {block} is not aligned to the \
                 device's {} bytes (O_DIRECT needs whole logical blocks)",
                self.align_bytes
            )));
        }
        Ok(block.0 * self.block_size_bytes + offset_bytes)
    }

    /// Checks vectored buffers: count, each length aligned, total inside the block.
    pub fn check_iovecs(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: &[IoBuf],
    ) -> io::Result<u64> {
        if bufs.len() > MAX_IOVECS {
            return Err(invalid(format!(
                "{} buffers in one vectored I/O; at most {MAX_IOVECS}",
                bufs.len()
            )));
        }
        if let Some(b) = bufs
            .iter()
            .find(|b| !(b.len() as u64).is_multiple_of(self.align_bytes))
        {
            return Err(invalid(format!(
                "a vectored I/O buffer of {} bytes is not a multiple of the device's {}-byte \
                 alignment",
                b.len(),
                self.align_bytes
            )));
        }
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_io(block, offset_bytes, total)
    }

    /// Checks `nr_blocks` blocks from `first`; returns (device offset, length) in bytes.
    pub fn check_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<(u64, u64)> {
        let end = first.0.checked_add(nr_blocks);
        if end.is_none_or(|end| end > self.nr_blocks) {
            return Err(invalid(format!(
                "data blocks {}..+{nr_blocks} go past the end of the device ({} blocks)",
                first.0, self.nr_blocks
            )));
        }
        Ok((
            first.0 * self.block_size_bytes,
            nr_blocks * self.block_size_bytes,
        ))
    }

    fn check_block(&self, block: DataBlock) -> io::Result<()> {
        if block.0 >= self.nr_blocks {
            return Err(invalid(format!(
                "{block} is past the end of the device ({} blocks)",
                self.nr_blocks
            )));
        }
        Ok(())
    }
}

pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The data device interface the pool engine is written against.
///
/// Futures are not required to be `Send`: an io_uring engine's I/O belongs to the ring of the
/// thread that started it (a ublk queue thread), and must be awaited there.
#[allow(
    async_fn_in_trait,
    reason = "engines run on one thread per queue; a Send bound would exclude the io_uring engine"
)]
pub trait DataDevice {
    /// Block size, block count and alignment.
    fn geometry(&self) -> DataGeometry;

    /// Reads `buf.len()` bytes at `offset_bytes` of `block` into `buf`.
    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()>;

    /// Writes `buf` at `offset_bytes` of `block`. Volatile until `flush`.
    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()>;

    /// Reads into `bufs` in order, as one contiguous range from `offset_bytes` of `block`.
    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult;

    /// Writes `bufs` in order, as one contiguous range from `offset_bytes` of `block`.
    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult;

    /// Makes `nr_blocks` blocks from `first` read as zeros.
    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive>;

    /// Copies block `from` to block `to` (breaking sharing). The blocks must differ.
    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()>;

    /// Passes a discard of `nr_blocks` blocks from `first` down to the device.
    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive>;

    /// Makes every completed write durable.
    async fn flush(&self) -> io::Result<()>;
}

/// The check every engine's `copy_block` starts with.
pub(crate) fn check_copy(
    geometry: &DataGeometry,
    from: DataBlock,
    to: DataBlock,
) -> io::Result<()> {
    geometry.check_blocks(from, 1)?;
    geometry.check_blocks(to, 1)?;
    if from == to {
        return Err(invalid(format!("copying {from} onto itself")));
    }
    Ok(())
}

/// Several tasks or threads may share one device (memory and fault-injecting devices in
/// tests, a pool's background work beside its queues).
macro_rules! forward_data_device {
    ($($ty:ty),*) => {$(
        impl<T: DataDevice> DataDevice for $ty {
            fn geometry(&self) -> DataGeometry {
                (**self).geometry()
            }

            async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
                (**self).read(block, offset_bytes, buf).await
            }

            async fn write(
                &self,
                block: DataBlock,
                offset_bytes: u64,
                buf: IoBuf,
            ) -> BufResult<()> {
                (**self).write(block, offset_bytes, buf).await
            }

            async fn read_vectored(
                &self,
                block: DataBlock,
                offset_bytes: u64,
                bufs: Vec<IoBuf>,
            ) -> BufsResult {
                (**self).read_vectored(block, offset_bytes, bufs).await
            }

            async fn write_vectored(
                &self,
                block: DataBlock,
                offset_bytes: u64,
                bufs: Vec<IoBuf>,
            ) -> BufsResult {
                (**self).write_vectored(block, offset_bytes, bufs).await
            }

            async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
                (**self).zero_blocks(first, nr_blocks).await
            }

            async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
                (**self).copy_block(from, to).await
            }

            async fn discard_blocks(
                &self,
                first: DataBlock,
                nr_blocks: u64,
            ) -> io::Result<Primitive> {
                (**self).discard_blocks(first, nr_blocks).await
            }

            async fn flush(&self) -> io::Result<()> {
                (**self).flush().await
            }
        }
    )*};
}

forward_data_device!(&T, std::sync::Arc<T>, std::rc::Rc<T>);
