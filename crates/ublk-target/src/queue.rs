//! One queue thread: a libublk queue, one async task per tag, and the loop that drives them.
//!
//! Each tag task loops FETCH -> run the request through the thin -> COMMIT_AND_FETCH, with the
//! tag's own buffer (the driver copies a write's data into it before the request arrives and
//! a read's data out of it at completion). The pool's data I/O for the request is submitted
//! on this queue's ring through `QueueRing`.
//!
//! The loop cannot be libublk's `wait_and_handle_io_events`: that sleeps in `io_uring_enter`,
//! and a task woken from another thread (a lock released by another queue's request, a commit
//! finished by the committer thread) would wait until some unrelated CQE arrived. Here the
//! thread sleeps in smol's reactor instead, on the ring fd's readability *or* the executor
//! having a runnable task, and every wake-up ends with the queued SQEs submitted.

use crate::request::{self, Request};
use crate::ring::QueueRing;
use block_io::data::{DataFile, IoBuf, Limits, UringDataDevice};
use libublk::io::{with_task_io_ring, with_task_io_ring_mut, BufDesc, UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use libublk::UblkError;
use smol::{Async, LocalExecutor, Task};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use thin_pool::{Pool, Thin};

/// What every queue thread of one device needs.
#[derive(Clone)]
pub(crate) struct QueueContext {
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    pub data: Arc<DataFile>,
    pub limits: Limits,
    /// Set when the device's thin lost acknowledged writes (see `request::handle`).
    pub lost_writes: Arc<AtomicBool>,
}

impl std::fmt::Debug for QueueContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueContext")
            .field("thin_id", &self.thin_id)
            .field("data", &self.data)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A queue set up and ready to run: everything that can fail before the device starts.
pub(crate) struct ReadyQueue<'a> {
    q: Rc<UblkQueue<'a>>,
    thin: Rc<Thin>,
    data: Rc<UringDataDevice<QueueRing>>,
    lost_writes: Arc<AtomicBool>,
    /// libublk counts a buffer per tag before it lets the device start; the tags' real
    /// buffers are block-io `IoBuf`s given to the driver by address, so these small ones
    /// only satisfy that count. They live as long as the queue.
    _reg_bufs: Vec<libublk::helpers::IoBuf<u8>>,
}

/// Sets up queue `qid`: its ring (created by `UblkQueue::new`, with the data device as fixed
/// file 1), a thin handle and a data engine on this thread.
pub(crate) fn setup<'a>(
    qid: u16,
    dev: &'a UblkDev,
    ctx: &QueueContext,
) -> Result<ReadyQueue<'a>, String> {
    let q = UblkQueue::new(qid, dev).map_err(|e| format!("queue {qid}: {e}"))?;
    let thin = ctx
        .pool
        .open_thin(ctx.thin_id)
        .map_err(|e| format!("queue {qid}: opening thin {}: {e}", ctx.thin_id))?;
    let ring = QueueRing::new(ctx.data.as_raw_fd());
    let data = UringDataDevice::with_ring(ctx.data.clone(), ctx.limits, ring)
        .map_err(|e| format!("queue {qid}: data engine: {e}"))?;
    let mut reg_bufs = Vec::new();
    for tag in q.tags() {
        let b = libublk::helpers::IoBuf::<u8>::new(crate::REG_BUF_BYTES);
        #[allow(deprecated)] // the only way to count a buffer the driver is not given
        q.register_io_buf(tag, &b);
        reg_bufs.push(b);
    }
    Ok(ReadyQueue {
        q: Rc::new(q),
        thin: Rc::new(thin),
        data: Rc::new(data),
        lost_writes: ctx.lost_writes.clone(),
        _reg_bufs: reg_bufs,
    })
}

/// The ring's fd for smol's reactor, without taking ownership of it.
struct RingFd(RawFd);

impl AsFd for RingFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring outlives every `RingFd` (both live for the queue loop).
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

/// Runs the queue until the device stops and every tag task has ended.
pub(crate) fn run(ready: ReadyQueue<'_>) {
    let exe = LocalExecutor::new();
    let io_buf_bytes = ready.q.dev.dev_info.max_io_buf_bytes as usize;
    let tasks: Vec<Task<()>> = ready
        .q
        .tags()
        .map(|tag| {
            let (q, thin, data) = (ready.q.clone(), ready.thin.clone(), ready.data.clone());
            let lost = ready.lost_writes.clone();
            exe.spawn(async move {
                match tag_task(&q, tag, &thin, &data, &lost, io_buf_bytes).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!("queue {} tag {tag}: {e}", q.get_qid()),
                }
            })
        })
        .collect();
    let ring = ready.data.ring();
    if let Err(e) = smol::block_on(drive(&exe, &ready.q, ring, &tasks)) {
        tracing::error!("queue {}: {e}", ready.q.get_qid());
    }
    // The tasks hold no SQE in flight once they finished; orphans may still wait for CQEs.
    while ring.reap_orphans() > 0 {
        if with_task_io_ring_mut(|r| r.submit_and_wait(1)).is_err() {
            break;
        }
        let _ = ublk_reap_io_events_with_update_queue(&ready.q, false, None, |cqe| {
            ublk_wake_task(cqe.user_data(), cqe)
        });
    }
}

/// Tasks polled between two visits to the ring.
const MAX_TICKS_PER_ROUND: usize = 256;

/// The queue's event loop (see the module docs).
async fn drive(
    exe: &LocalExecutor<'_>,
    q: &UblkQueue<'_>,
    ring: &QueueRing,
    tasks: &[Task<()>],
) -> Result<(), String> {
    let ring_fd = Async::new(RingFd(with_task_io_ring(|r| r.as_raw_fd())))
        .map_err(|e| format!("watching the queue ring: {e}"))?;
    loop {
        // Bounded, so that a task that keeps yielding cannot hold back submitting and
        // reaping; what is still runnable is picked up by `exe.tick()` below at once.
        for _ in 0..MAX_TICKS_PER_ROUND {
            if !exe.try_tick() {
                break;
            }
        }
        ring.reap_orphans();
        if tasks.iter().all(|t| t.is_finished()) {
            return Ok(());
        }
        let queued = with_task_io_ring_mut(|r| !r.submission().is_empty());
        if queued {
            if let Err(e) = with_task_io_ring_mut(|r| r.submit()) {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    return Err(format!("submitting to the queue ring: {e}"));
                }
            }
        }
        let mut reaped = 0usize;
        ublk_reap_io_events_with_update_queue(q, false, None, |cqe| {
            reaped += 1;
            ublk_wake_task(cqe.user_data(), cqe);
        })
        .map_err(|e| format!("reaping the queue ring: {e}"))?;
        if reaped > 0 {
            continue;
        }
        // Nothing completed and nothing runnable: sleep until a CQE arrives or a task is woken
        // (from this thread or another).
        smol::future::or(
            async {
                // An error here (the ring fd gone) ends in the submit above failing next time.
                let _ = ring_fd.readable().await;
            },
            exe.tick(),
        )
        .await;
    }
}

/// One tag: fetch a request, run it, commit its result and fetch the next, until the queue
/// goes down.
async fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    thin: &Thin,
    data: &UringDataDevice<QueueRing>,
    lost_writes: &AtomicBool,
    io_buf_bytes: usize,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::new(io_buf_bytes);
    q.submit_io_prep_cmd(tag, BufDesc::RawAddress(buf_addr(&mut buf)), -1, None)
        .await?;
    loop {
        let req = Request::decode(q.get_iod(tag));
        let (res, b) = request::handle(thin, data, lost_writes, req, buf).await;
        buf = b;
        q.submit_io_commit_cmd(tag, BufDesc::RawAddress(buf_addr(&mut buf)), res)
            .await?;
    }
}

/// The address the driver copies to and from: the whole buffer, writable.
fn buf_addr(buf: &mut IoBuf) -> *const u8 {
    let cap = buf.capacity();
    buf.set_len(cap);
    buf[..].as_mut_ptr() as *const u8
}
