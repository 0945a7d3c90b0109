//! The ring abstraction the io_uring engine submits on, and the future that keeps an SQE's
//! memory alive until its CQE.
//!
//! A `RingSubmitter` is "the io_uring of the current thread": block-io's own standalone ring
//! (`StandaloneRing`, driven by `rt::block_on`), or, inside a ublk queue thread, the queue's
//! ring, which ublk-target adapts (libublk 0.4.8's `ublk_submit_sqe_async(sqe, user_data)`
//! future is a valid `Op`; the data device goes in `dev.tgt.fds[1]`, i.e. `Fixed(1)`).
//! block-io does not depend on ublk.
//!
//! The contract that makes dropped futures safe: io_uring cancellation is not a guarantee
//! (seed 001: "we have to wait for their completion no matter what"), so when a caller drops an
//! operation with its SQE in flight, `InFlight::drop` hands the memory the SQE points at (the
//! buffer, the iovec array, the permit, the file) to `RingSubmitter::detach`, and the ring
//! drops it only when the CQE arrives. An adapter for a ring whose futures cannot carry that
//! memory keeps it in an `OrphanList` and reaps it from its event loop.
//!
//! Invariants: every SQE pushed through `submit` is referenced by exactly one `InFlight`,
//! which ends in exactly one of: its `Op` completed (memory returned to the caller), or
//! `detach` (memory owned by the ring until the CQE). Nothing here frees memory early.

use crate::data::file::DataFile;
use io_uring::squeue;
use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// How an SQE names the data device on a given ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileTarget {
    /// An index into the ring's registered file table (cheaper: no fd lookup per I/O).
    Fixed(u32),
    /// A plain file descriptor, when the ring has no registered slot for the file.
    Fd(RawFd),
}

/// The io_uring of the current thread, as the data engine sees it.
pub trait RingSubmitter {
    /// Resolves to the CQE's `res` of one pushed SQE.
    type Op: Future<Output = i32> + Unpin;

    /// Queues `sqe` (its `user_data` is the ring's to set); it is submitted at the ring's next
    /// `io_uring_enter`, so SQEs pushed in one executor tick are submitted together.
    ///
    /// # Safety
    /// Every address the SQE carries (buffers, iovec arrays and the buffers they point at) and
    /// its file must stay valid until the CQE arrives: until the returned `Op` resolves, or, if
    /// the `Op` is abandoned, until the ring drops the keepalive given to `detach`.
    unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<Self::Op>;

    /// Takes over an `Op` whose awaiting future was dropped before it resolved. The ring must
    /// keep `keepalive` (the memory and file the SQE uses) until that SQE's CQE arrives, and
    /// drop it then; never before.
    fn detach(&self, op: Self::Op, keepalive: Box<dyn Any>);

    /// Where `file` sits on this ring.
    fn file_target(&self, file: &Arc<DataFile>) -> FileTarget;

    /// Called when the last engine over `file` is dropped on this thread (no I/O of it is in
    /// flight): a ring that registered the file itself should unregister it, or the file stays
    /// open (a block device stays busy) as long as the ring lives. Rings whose owner
    /// registered the file (a ublk queue's) do nothing, the default.
    fn forget_file(&self, file: &Arc<DataFile>) {
        let _ = file;
    }
}

/// An SQE in flight together with the memory it uses.
///
/// Resolves to the CQE's `res` and gives the keepalive back; dropped early, it detaches both.
pub(crate) struct InFlight<'r, R: RingSubmitter, K: 'static> {
    ring: &'r R,
    op: Option<R::Op>,
    keepalive: Option<K>,
}

/// Pushes `sqe` and ties `keepalive` to it.
///
/// # Safety
/// Every address in `sqe` must point into heap memory owned by `keepalive` (which may be
/// moved, but not mutated or freed, while the SQE is in flight) or be otherwise valid until
/// the CQE; the file it names must be kept open by `keepalive` or registered with the ring.
pub(crate) unsafe fn submit<'r, R: RingSubmitter, K: 'static>(
    ring: &'r R,
    sqe: squeue::Entry,
    keepalive: K,
) -> Result<InFlight<'r, R, K>, (io::Error, K)> {
    // SAFETY: forwarded from this function's contract; `InFlight` keeps `keepalive` until the
    // op resolves and detaches it otherwise.
    match unsafe { ring.push(sqe) } {
        Ok(op) => Ok(InFlight {
            ring,
            op: Some(op),
            keepalive: Some(keepalive),
        }),
        Err(e) => Err((e, keepalive)),
    }
}

// `K` is only ever moved, never pinned, and `R::Op` is `Unpin`.
impl<R: RingSubmitter, K: 'static> Unpin for InFlight<'_, R, K> {}

impl<R: RingSubmitter, K: 'static> Future for InFlight<'_, R, K> {
    type Output = (i32, K);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, K)> {
        let this = &mut *self;
        let Some(op) = this.op.as_mut() else {
            panic!("InFlight polled after it resolved");
        };
        match Pin::new(op).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(res) => {
                this.op = None;
                let Some(keepalive) = this.keepalive.take() else {
                    panic!("InFlight lost its keepalive");
                };
                Poll::Ready((res, keepalive))
            }
        }
    }
}

impl<R: RingSubmitter, K: 'static> Drop for InFlight<'_, R, K> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            let keepalive: Box<dyn Any> = Box::new(self.keepalive.take());
            self.ring.detach(op, keepalive);
        }
    }
}

/// Abandoned ops of a ring whose op futures cannot carry a keepalive (libublk's), each with
/// the memory its SQE uses. An adapter pushes into it from `detach` and calls `reap` from its
/// event loop (after each batch of CQEs); `reap` polls every orphan and frees the memory of
/// those whose CQE has arrived. Its length is bounded by the engines' in-flight limits, since
/// every keepalive holds its engine's permit.
pub struct OrphanList<Op> {
    orphans: RefCell<Vec<(Op, Box<dyn Any>)>>,
}

impl<Op> Default for OrphanList<Op> {
    fn default() -> Self {
        Self {
            orphans: RefCell::new(Vec::new()),
        }
    }
}

impl<Op> fmt::Debug for OrphanList<Op> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrphanList")
            .field("len", &self.orphans.borrow().len())
            .finish()
    }
}

impl<Op: Future<Output = i32> + Unpin> OrphanList<Op> {
    /// Keeps `keepalive` until `op` resolves.
    pub fn push(&self, op: Op, keepalive: Box<dyn Any>) {
        self.orphans.borrow_mut().push((op, keepalive));
    }

    /// Drops the keepalives of orphans whose op has resolved; returns how many remain.
    pub fn reap(&self) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let mut done = Vec::new();
        let remaining = {
            let mut orphans = self.orphans.borrow_mut();
            let mut i = 0;
            while i < orphans.len() {
                if Pin::new(&mut orphans[i].0).poll(&mut cx).is_ready() {
                    done.push(orphans.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            orphans.len()
        };
        // Dropped outside the borrow: a keepalive's drop releases permits and wakes tasks.
        drop(done);
        remaining
    }

    /// Orphans whose CQE has not been seen yet.
    pub fn len(&self) -> usize {
        self.orphans.borrow().len()
    }

    /// Whether no orphan is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
