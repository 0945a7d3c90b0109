//! The io_uring data engine: O_DIRECT reads and writes, fallocate zero/punch and fdatasync as
//! SQEs on the current thread's ring, so under ublk one `io_uring_enter` both completes data
//! I/O and fetches the next ublk command.
//!
//! Each operation: check the range, take a permit (FIFO under the engine's limits), then loop
//! submitting the remainder until the whole range moved. Short transfers resubmit the rest;
//! EAGAIN and EINTR resubmit as they are; a transfer of 0 bytes is an error (the device is
//! shorter than its geometry says). Every SQE's buffer, iovec array, permit and file travel in
//! its `InFlight` keepalive, so a dropped future frees nothing before the CQE.
//!
//! Primitives: zeroing uses `fallocate(ZERO_RANGE)` through the ring on regular files and block
//! devices alike (on a block device the kernel implements it exactly as BLKZEROOUT), falling
//! back to writing zeros; discarding uses `fallocate(PUNCH_HOLE)` through the ring on regular
//! files and the BLKDISCARD ioctl, synchronously, on block devices (io_uring's block discard
//! command needs Linux 6.12). Copies read and write through a bounce buffer of at most 1 MiB,
//! allocated after its permit is granted.
//!
//! Invariants: a permit is held for the whole of an operation and released after its last
//! CQE; no loop here runs more than `MAX_SUBMITS_PER_OP` SQEs for one range.

use super::file::{DataFile, FileKind, MAX_ZERO_CHUNK_BYTES};
use super::limits::{Limiter, LimiterStats, Limits, Permit};
use super::rt::{self, FileTarget, RingConfig, RingSubmitter, StandaloneRing};
use super::{
    check_copy, BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, DiscardPolicy, IoBuf,
    Primitive,
};
use io_uring::{opcode, squeue, types};
use std::fmt;
use std::io;
use std::sync::Arc;

/// Resubmissions one range may take (short transfers, EAGAIN, EINTR) before it fails.
const MAX_SUBMITS_PER_OP: usize = 64;
/// Bounce buffer of one copy step.
const MAX_COPY_CHUNK_BYTES: u64 = 1 << 20;

/// Builds an SQE for `target`, whichever of the two fd types it is.
macro_rules! on_target {
    ($target:expr, |$fd:ident| $build:expr) => {
        match $target {
            FileTarget::Fixed(index) => {
                let $fd = types::Fixed(index);
                $build
            }
            FileTarget::Fd(raw) => {
                let $fd = types::Fd(raw);
                $build
            }
        }
    };
}

/// An io_uring data engine over ring `R` (the standalone per-thread ring by default).
pub struct UringDataDevice<R: RingSubmitter = StandaloneRing> {
    file: Arc<DataFile>,
    limiter: Arc<Limiter>,
    ring: R,
    discard_policy: DiscardPolicy,
}

impl<R: RingSubmitter> fmt::Debug for UringDataDevice<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringDataDevice")
            .field("file", &self.file)
            .field("limiter", &self.limiter)
            .field("discard_policy", &self.discard_policy)
            .finish()
    }
}

impl UringDataDevice<StandaloneRing> {
    /// An engine on block-io's standalone rings. Sets up the calling thread's ring now, so an
    /// io_uring that cannot work fails here (with the setup errno) rather than at the first I/O.
    pub fn new(file: DataFile, limits: Limits, ring: RingConfig) -> io::Result<Self> {
        let ring = StandaloneRing::new(ring);
        ring.init()?;
        Self::with_ring(Arc::new(file), limits, ring)
    }
}

impl<R: RingSubmitter> UringDataDevice<R> {
    /// An engine submitting on `ring` (e.g. a ublk queue's ring, whose fixed file table
    /// already holds `file`).
    pub fn with_ring(file: Arc<DataFile>, limits: Limits, ring: R) -> io::Result<Self> {
        Ok(Self {
            file,
            limiter: Limiter::new(limits)?,
            ring,
            discard_policy: DiscardPolicy::default(),
        })
    }

    /// Sets what a discard does on a regular file.
    pub fn set_discard_policy(&mut self, policy: DiscardPolicy) {
        self.discard_policy = policy;
    }

    /// The ring it submits on.
    pub fn ring(&self) -> &R {
        &self.ring
    }

    /// The open data device.
    pub fn file(&self) -> &Arc<DataFile> {
        &self.file
    }

    /// The engine's limits.
    pub fn limits(&self) -> Limits {
        self.limiter.limits()
    }

    /// In-flight counters.
    pub fn limiter_stats(&self) -> LimiterStats {
        self.limiter.stats()
    }

    fn os_err(&self, res: i32, what: &str, offset: u64, len: u64) -> io::Error {
        self.file
            .err(io::Error::from_raw_os_error(-res), what, offset, len)
    }

    /// Submits one SQE built by `build` (from the keepalive) and waits for its CQE.
    async fn one<K: 'static>(
        &self,
        keepalive: K,
        build: impl FnOnce(&mut K) -> squeue::Entry,
    ) -> (io::Result<i32>, K) {
        let mut keepalive = keepalive;
        let sqe = build(&mut keepalive);
        // SAFETY: every `build` below points the SQE only into heap memory owned by the
        // keepalive (an `IoBuf`'s allocation, a boxed iovec array and the `IoBuf`s it points
        // into) and at a file the keepalive's `Arc<DataFile>` keeps open.
        match unsafe { rt::submit(&self.ring, sqe, keepalive) } {
            Ok(in_flight) => {
                let (res, keepalive) = in_flight.await;
                (Ok(res), keepalive)
            }
            Err((e, keepalive)) => (Err(e), keepalive),
        }
    }

    /// Reads or writes all of `buf` at device offset `pos`, under `permit`.
    /// `read` or `write`: checks the range, then one operation within the in-flight budget.
    async fn checked_rw(
        &self,
        write: bool,
        block: DataBlock,
        offset_bytes: u64,
        buf: IoBuf,
    ) -> BufResult<()> {
        let pos = match self
            .geometry()
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(pos) => pos,
            Err(e) => return (Err(e), buf),
        };
        if buf.is_empty() {
            return (Ok(()), buf);
        }
        let permit = self.limiter.acquire(buf.len()).await;
        let (res, buf, _permit) = self.rw(write, pos, buf, permit).await;
        (res, buf)
    }

    async fn rw(
        &self,
        write: bool,
        pos: u64,
        buf: IoBuf,
        permit: Permit,
    ) -> (io::Result<()>, IoBuf, Permit) {
        let len = buf.len();
        let what = if write { "writing" } else { "reading" };
        let target = self.ring.file_target(&self.file);
        let mut keep = (buf, permit, Arc::clone(&self.file));
        let mut done = 0usize;
        for _ in 0..MAX_SUBMITS_PER_OP {
            if done == len {
                return (Ok(()), keep.0, keep.1);
            }
            let (res, k) = self
                .one(keep, |k| {
                    let ptr = k.0.as_mut_ptr().wrapping_add(done);
                    let n = (len - done) as u32;
                    let off = pos + done as u64;
                    on_target!(target, |fd| if write {
                        opcode::Write::new(fd, ptr, n).offset(off).build()
                    } else {
                        opcode::Read::new(fd, ptr, n).offset(off).build()
                    })
                })
                .await;
            keep = k;
            match res {
                Err(e) => return (Err(e), keep.0, keep.1),
                Ok(n) if n > 0 => done += n as usize,
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the device ended before its geometry says",
                    );
                    let e = self
                        .file
                        .err(e, what, pos + done as u64, (len - done) as u64);
                    return (Err(e), keep.0, keep.1);
                }
                Ok(n) if n == -libc::EAGAIN || n == -libc::EINTR => {}
                Ok(n) => {
                    let e = self.os_err(n, what, pos + done as u64, (len - done) as u64);
                    return (Err(e), keep.0, keep.1);
                }
            }
        }
        let e = io::Error::other(format!(
            "gave up after {MAX_SUBMITS_PER_OP} partial transfers"
        ));
        (Err(self.file.err(e, what, pos, len as u64)), keep.0, keep.1)
    }

    async fn rw_vectored(&self, write: bool, pos: u64, bufs: Vec<IoBuf>) -> BufsResult {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let what = if write {
            "writing (vectored)"
        } else {
            "reading (vectored)"
        };
        let permit = self.limiter.acquire(total).await;
        let target = self.ring.file_target(&self.file);
        let mut keep = (
            bufs,
            Vec::<libc::iovec>::new(),
            permit,
            Arc::clone(&self.file),
        );
        let mut done = 0usize;
        for _ in 0..MAX_SUBMITS_PER_OP {
            if done == total {
                return (Ok(()), keep.0);
            }
            let (res, k) = self
                .one(keep, |k| {
                    k.1 = iovecs_after(&mut k.0, done);
                    let off = pos + done as u64;
                    let (ptr, n) = (k.1.as_ptr(), k.1.len() as u32);
                    on_target!(target, |fd| if write {
                        opcode::Writev::new(fd, ptr, n).offset(off).build()
                    } else {
                        opcode::Readv::new(fd, ptr, n).offset(off).build()
                    })
                })
                .await;
            keep = k;
            match res {
                Err(e) => return (Err(e), keep.0),
                Ok(n) if n > 0 => done += n as usize,
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "device ended early");
                    let e = self
                        .file
                        .err(e, what, pos + done as u64, (total - done) as u64);
                    return (Err(e), keep.0);
                }
                Ok(n) if n == -libc::EAGAIN || n == -libc::EINTR => {}
                Ok(n) => {
                    let e = self.os_err(n, what, pos + done as u64, (total - done) as u64);
                    return (Err(e), keep.0);
                }
            }
        }
        let e = io::Error::other(format!(
            "gave up after {MAX_SUBMITS_PER_OP} partial transfers"
        ));
        (Err(self.file.err(e, what, pos, total as u64)), keep.0)
    }

    /// One fallocate SQE over `[offset, offset + len)`.
    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let permit = self.limiter.acquire(0).await;
        let target = self.ring.file_target(&self.file);
        let keep = (permit, Arc::clone(&self.file));
        let (res, _keep) = self
            .one(keep, |_| {
                on_target!(target, |fd| opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build())
            })
            .await;
        match res? {
            0 => Ok(()),
            n => Err(io::Error::from_raw_os_error(-n)),
        }
    }

    /// Writes zeros over `[offset, offset + len)` in chunks, one bounce buffer at a time.
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = len.min(MAX_ZERO_CHUNK_BYTES);
        let permit = self.limiter.acquire(chunk as usize).await;
        let mut buf = IoBuf::new(chunk as usize);
        let mut permit = permit;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            buf.set_len(n as usize);
            let (res, b, p) = self.rw(true, offset + done, buf, permit).await;
            res?;
            (buf, permit) = (b, p);
            done += n;
        }
        Ok(())
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<Primitive> {
        // ZERO_RANGE on a block device is blkdev_issue_zeroout, what BLKZEROOUT does.
        let (mode, primitive) = match self.file.kind() {
            FileKind::BlockDevice => (
                Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
                Primitive::BlkZeroOut,
            ),
            FileKind::Regular => (self.file.zero_range_mode(), Primitive::FallocZeroRange),
        };
        if let Some(mode) = mode {
            match self.fallocate(mode, offset, len).await {
                Ok(()) => return Ok(primitive),
                Err(e) if self.file.note_unsupported(mode, &e) => {}
                Err(e) => return Err(self.file.err(e, "zeroing (fallocate)", offset, len)),
            }
        }
        self.write_zeroes(offset, len).await?;
        Ok(Primitive::WriteZeroes)
    }
}

impl<R: RingSubmitter> Drop for UringDataDevice<R> {
    fn drop(&mut self) {
        // Orphaned I/O holds clones of the file; while it runs, the registration must stay.
        if Arc::strong_count(&self.file) == 1 {
            self.ring.forget_file(&self.file);
        }
    }
}

/// iovecs for the bytes of `bufs` after the first `skip`.
fn iovecs_after(bufs: &mut [IoBuf], skip: usize) -> Vec<libc::iovec> {
    let mut skip = skip;
    let mut iovecs = Vec::with_capacity(bufs.len());
    for buf in bufs {
        let len = buf.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        iovecs.push(libc::iovec {
            iov_base: buf.as_mut_ptr().wrapping_add(skip).cast(),
            iov_len: len - skip,
        });
        skip = 0;
    }
    iovecs
}

impl<R: RingSubmitter> DataDevice for UringDataDevice<R> {
    fn geometry(&self) -> DataGeometry {
        self.file.geometry()
    }

    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        self.checked_rw(false, block, offset_bytes, buf).await
    }

    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        self.checked_rw(true, block, offset_bytes, buf).await
    }

    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        match self.geometry().check_iovecs(block, offset_bytes, &bufs) {
            Ok(pos) => self.rw_vectored(false, pos, bufs).await,
            Err(e) => (Err(e), bufs),
        }
    }

    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        match self.geometry().check_iovecs(block, offset_bytes, &bufs) {
            Ok(pos) => self.rw_vectored(true, pos, bufs).await,
            Err(e) => (Err(e), bufs),
        }
    }

    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry().check_blocks(first, nr_blocks)?;
        if len == 0 {
            return Ok(Primitive::Ignored);
        }
        self.zero_range(offset, len).await
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        let geometry = self.geometry();
        check_copy(&geometry, from, to)?;
        let block_size = geometry.block_size_bytes;
        let chunk = block_size.min(MAX_COPY_CHUNK_BYTES);
        let mut permit = self.limiter.acquire(chunk as usize).await;
        // Allocated only now that its memory is granted (seed 000 P10).
        let mut buf = IoBuf::new(chunk as usize);
        let mut done = 0;
        while done < block_size {
            let n = (block_size - done).min(chunk);
            buf.set_len(n as usize);
            let (res, b, p) = self
                .rw(false, from.0 * block_size + done, buf, permit)
                .await;
            res?;
            let (res, b, p) = self.rw(true, to.0 * block_size + done, b, p).await;
            res?;
            (buf, permit) = (b, p);
            done += n;
        }
        Ok(())
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry().check_blocks(first, nr_blocks)?;
        if len == 0 || self.discard_policy == DiscardPolicy::Ignore {
            return Ok(Primitive::Ignored);
        }
        if self.file.kind() == FileKind::BlockDevice {
            // Synchronous: BLKDISCARD has no io_uring form before Linux 6.12.
            let _permit = self.limiter.acquire(0).await;
            return self.file.discard_sync(offset, len, self.discard_policy);
        }
        if let Some((mode, primitive)) = self.file.discard_mode(self.discard_policy) {
            match self.fallocate(mode, offset, len).await {
                Ok(()) => return Ok(primitive),
                Err(e) if self.file.note_unsupported(mode, &e) => {}
                Err(e) => return Err(self.file.err(e, "discarding (fallocate)", offset, len)),
            }
        }
        self.zero_range(offset, len).await
    }

    async fn flush(&self) -> io::Result<()> {
        let permit = self.limiter.acquire(0).await;
        let target = self.ring.file_target(&self.file);
        let keep = (permit, Arc::clone(&self.file));
        let (res, _keep) = self
            .one(keep, |_| {
                on_target!(target, |fd| opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build())
            })
            .await;
        match res {
            Ok(0) => Ok(()),
            Ok(n) => Err(self.os_err(n, "flushing", 0, 0)),
            Err(e) => Err(e),
        }
    }
}
