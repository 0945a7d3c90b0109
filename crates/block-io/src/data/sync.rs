//! The synchronous fallback engine: pread/pwrite, fallocate, ioctls and fdatasync, for hosts
//! where io_uring cannot be set up (seed 000 P9, seed 001: no async context must not mean no
//! I/O), or when chosen by option.
//!
//! Two modes. `SyncMode::Pool` (the default) runs each operation on a small fixed pool of
//! threads, so a queue depth above one still overlaps I/O; the pool is bounded (at most
//! `MAX_POOL_THREADS`, 4 by default) because seed 002's point stands: threads per I/O are
//! overscheduling, and a fallback only has to be correct and not pathological. A finished job
//! wakes its future through the future's waker, so the executor must accept wakes from other
//! threads (`rt::block_on` does). `SyncMode::Inline` runs the syscall inside `poll`: no threads
//! and no cross-thread wake, but the calling thread blocks for each I/O (queue depth 1). Use it
//! under an executor that sleeps somewhere a foreign waker cannot reach (a ublk queue thread
//! sleeping in `io_uring_enter`).
//!
//! Invariants: a job owns its buffer, permit and file until it finishes, so a dropped future
//! frees nothing early (the job completes and drops them); the job queue is bounded by the
//! engine's in-flight limit, since a job is queued only with a permit; dropping the engine
//! finishes every queued job before its threads exit.

use super::file::{DataFile, FileKind, MAX_ZERO_CHUNK_BYTES};
use super::limits::{Limiter, LimiterStats, Limits};
use super::{
    check_copy, BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, DiscardPolicy, IoBuf,
    Primitive,
};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

/// Most worker threads a pool may have.
pub const MAX_POOL_THREADS: usize = 64;
/// Bounce buffer of one copy step.
const MAX_COPY_CHUNK_BYTES: u64 = 1 << 20;

/// Where the synchronous engine runs its syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// In the caller's thread, inside `poll`.
    Inline,
    /// On a pool of this many threads (1..=`MAX_POOL_THREADS`).
    Pool {
        /// Worker threads.
        nr_threads: usize,
    },
}

impl Default for SyncMode {
    fn default() -> Self {
        Self::Pool { nr_threads: 4 }
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct PoolQueue {
    jobs: VecDeque<Job>,
    shutdown: bool,
}

struct PoolShared {
    queue: Mutex<PoolQueue>,
    cv: Condvar,
}

struct Pool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(nr_threads: usize) -> io::Result<Self> {
        if !(1..=MAX_POOL_THREADS).contains(&nr_threads) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sync engine pool of {nr_threads} threads; use 1..={MAX_POOL_THREADS}"),
            ));
        }
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(PoolQueue {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            cv: Condvar::new(),
        });
        let threads = (0..nr_threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("block-io-sync-{i}"))
                    .spawn(move || worker(&shared))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { shared, threads })
    }

    fn submit(&self, job: Job) {
        self.shared.queue.lock().jobs.push_back(job);
        self.shared.cv.notify_one();
    }
}

fn worker(shared: &PoolShared) {
    loop {
        let job = {
            let mut queue = shared.queue.lock();
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.shutdown {
                    return;
                }
                shared.cv.wait(&mut queue);
            }
        };
        // A panicking job drops its sender, which its future reports as an error; the worker
        // lives on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.cv.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct Slot<T> {
    value: Option<T>,
    closed: bool,
    waker: Option<Waker>,
}

struct Sender<T>(Arc<Mutex<Slot<T>>>);

impl<T> Sender<T> {
    fn send(self, value: T) {
        self.0.lock().value = Some(value);
        // `drop(self)` marks the slot closed and wakes the receiver.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.0.lock();
            slot.closed = true;
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

struct Receiver<T>(Arc<Mutex<Slot<T>>>);

impl<T> Future for Receiver<T> {
    /// `None` if the job panicked.
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut slot = self.0.lock();
        if let Some(value) = slot.value.take() {
            return Poll::Ready(Some(value));
        }
        if slot.closed {
            return Poll::Ready(None);
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        closed: false,
        waker: None,
    }));
    (Sender(Arc::clone(&slot)), Receiver(slot))
}

fn worker_died() -> io::Error {
    io::Error::other("a block-io sync I/O worker panicked during the operation")
}

/// The synchronous data engine.
pub struct SyncDataDevice {
    file: Arc<DataFile>,
    limiter: Arc<Limiter>,
    pool: Option<Pool>,
    discard_policy: DiscardPolicy,
    fallback_reason: Option<String>,
}

impl fmt::Debug for SyncDataDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncDataDevice")
            .field("file", &self.file)
            .field("limiter", &self.limiter)
            .field(
                "nr_threads",
                &self.pool.as_ref().map_or(0, |p| p.threads.len()),
            )
            .field("fallback_reason", &self.fallback_reason)
            .finish()
    }
}

impl SyncDataDevice {
    /// A synchronous engine over `file`.
    pub fn new(file: DataFile, limits: Limits, mode: SyncMode) -> io::Result<Self> {
        let pool = match mode {
            SyncMode::Inline => None,
            SyncMode::Pool { nr_threads } => Some(Pool::new(nr_threads)?),
        };
        Ok(Self {
            file: Arc::new(file),
            limiter: Limiter::new(limits)?,
            pool,
            discard_policy: DiscardPolicy::default(),
            fallback_reason: None,
        })
    }

    /// Sets what a discard does on a regular file.
    pub fn set_discard_policy(&mut self, policy: DiscardPolicy) {
        self.discard_policy = policy;
    }

    /// Records why this engine was chosen over io_uring.
    pub(crate) fn set_fallback_reason(&mut self, reason: String) {
        self.fallback_reason = Some(reason);
    }

    /// The warning line that explained the fallback, if this engine is one.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The open data device.
    pub fn file(&self) -> &Arc<DataFile> {
        &self.file
    }

    /// In-flight counters.
    pub fn limiter_stats(&self) -> LimiterStats {
        self.limiter.stats()
    }

    /// Runs `job` inline or on the pool; `None` if it panicked.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        match &self.pool {
            None => Some(job()),
            Some(pool) => {
                let (tx, rx) = oneshot();
                pool.submit(Box::new(move || tx.send(job())));
                rx.await
            }
        }
    }

    /// `read` or `write`: checks the range, then one operation.
    async fn checked_rw(
        &self,
        write: bool,
        block: DataBlock,
        offset_bytes: u64,
        buf: IoBuf,
    ) -> BufResult<()> {
        match self
            .geometry()
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(_) if buf.is_empty() => (Ok(()), buf),
            Ok(pos) => self.rw(write, pos, buf).await,
            Err(e) => (Err(e), buf),
        }
    }

    async fn rw(&self, write: bool, pos: u64, buf: IoBuf) -> BufResult<()> {
        let permit = self.limiter.acquire(buf.len()).await;
        let file = Arc::clone(&self.file);
        let done = self
            .run(move || {
                let mut buf = buf;
                let res = if write {
                    file.file().write_all_at(&buf, pos)
                } else {
                    file.file().read_exact_at(&mut buf, pos)
                };
                let what = if write { "writing" } else { "reading" };
                let res = res.map_err(|e| file.err(e, what, pos, buf.len() as u64));
                drop(permit);
                (res, buf)
            })
            .await;
        done.unwrap_or_else(|| (Err(worker_died()), IoBuf::new(0)))
    }

    async fn rw_vectored(&self, write: bool, pos: u64, bufs: Vec<IoBuf>) -> BufsResult {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let permit = self.limiter.acquire(total).await;
        let file = Arc::clone(&self.file);
        let done = self
            .run(move || {
                let mut bufs = bufs;
                let mut off = pos;
                for buf in &mut bufs {
                    let res = if write {
                        file.file().write_all_at(buf, off)
                    } else {
                        file.file().read_exact_at(buf, off)
                    };
                    if let Err(e) = res {
                        let what = if write {
                            "writing (vectored)"
                        } else {
                            "reading (vectored)"
                        };
                        return (Err(file.err(e, what, off, buf.len() as u64)), bufs);
                    }
                    off += buf.len() as u64;
                }
                drop(permit);
                (Ok(()), bufs)
            })
            .await;
        done.unwrap_or_else(|| (Err(worker_died()), Vec::new()))
    }

    /// Bytes of bounce buffer a zero of `len` bytes may need: only when it writes zeros.
    fn zero_budget(&self, len: u64) -> usize {
        let writes = self.file.kind() == FileKind::Regular && self.file.zero_range_mode().is_none();
        if writes {
            len.min(MAX_ZERO_CHUNK_BYTES) as usize
        } else {
            0
        }
    }
}

impl DataDevice for SyncDataDevice {
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
        let permit = self.limiter.acquire(self.zero_budget(len)).await;
        let file = Arc::clone(&self.file);
        self.run(move || {
            let res = file.zero_sync(offset, len);
            drop(permit);
            res
        })
        .await
        .unwrap_or_else(|| Err(worker_died()))
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        let geometry = self.geometry();
        check_copy(&geometry, from, to)?;
        let block_size = geometry.block_size_bytes;
        let chunk = block_size.min(MAX_COPY_CHUNK_BYTES);
        let permit = self.limiter.acquire(chunk as usize).await;
        let file = Arc::clone(&self.file);
        self.run(move || {
            let mut buf = IoBuf::new(chunk as usize);
            let mut done = 0;
            while done < block_size {
                let n = (block_size - done).min(chunk);
                buf.set_len(n as usize);
                let src = from.0 * block_size + done;
                let dst = to.0 * block_size + done;
                file.file()
                    .read_exact_at(&mut buf, src)
                    .map_err(|e| file.err(e, "reading (copy)", src, n))?;
                file.file()
                    .write_all_at(&buf, dst)
                    .map_err(|e| file.err(e, "writing (copy)", dst, n))?;
                done += n;
            }
            drop(permit);
            Ok(())
        })
        .await
        .unwrap_or_else(|| Err(worker_died()))
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry().check_blocks(first, nr_blocks)?;
        if len == 0 || self.discard_policy == DiscardPolicy::Ignore {
            return Ok(Primitive::Ignored);
        }
        let permit = self.limiter.acquire(self.zero_budget(len)).await;
        let file = Arc::clone(&self.file);
        let policy = self.discard_policy;
        self.run(move || {
            let res = file.discard_sync(offset, len, policy);
            drop(permit);
            res
        })
        .await
        .unwrap_or_else(|| Err(worker_died()))
    }

    async fn flush(&self) -> io::Result<()> {
        let permit = self.limiter.acquire(0).await;
        let file = Arc::clone(&self.file);
        self.run(move || {
            let res = file.sync_data();
            drop(permit);
            res
        })
        .await
        .unwrap_or_else(|| Err(worker_died()))
    }
}
