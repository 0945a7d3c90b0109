//! block-io's `RingSubmitter` over a libublk queue's io_uring, so the pool's data I/O goes on
//! the same ring as the ublk commands and one `io_uring_enter` both completes data I/O and
//! fetches the next request.
//!
//! An SQE's future is libublk's `UblkUringOpFuture` (a key into libublk's thread-local slab,
//! woken when the queue loop reaps its CQE). An op whose caller gave up before the CQE goes to
//! the `OrphanList` with the memory it uses, and the queue loop reaps the list after each
//! batch of CQEs: no buffer is freed before the kernel is done with it.

use block_io::data::rt::{FileTarget, OrphanList, RingSubmitter};
use block_io::data::DataFile;
use io_uring::squeue;
use libublk::io::with_task_io_ring_mut;
use libublk::uring_async::UblkUringOpFuture;
use libublk::UblkUringData;
use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// The fixed-file index of the data device on every queue ring (0 is `/dev/ublkcN`).
pub(crate) const DATA_FIXED_INDEX: u32 = 1;

/// The current queue thread's ring, as block-io's data engine sees it.
#[derive(Debug)]
pub(crate) struct QueueRing {
    /// The data device's fd, registered at `DATA_FIXED_INDEX`.
    data_fd: RawFd,
    orphans: OrphanList<UblkUringOpFuture>,
}

impl QueueRing {
    pub(crate) fn new(data_fd: RawFd) -> Self {
        Self {
            data_fd,
            orphans: OrphanList::default(),
        }
    }

    /// Frees the memory of abandoned ops whose CQE has arrived; returns how many remain.
    pub(crate) fn reap_orphans(&self) -> usize {
        if self.orphans.is_empty() {
            0
        } else {
            self.orphans.reap()
        }
    }
}

impl RingSubmitter for QueueRing {
    type Op = UblkUringOpFuture;

    unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<Self::Op> {
        let op = UblkUringOpFuture::new(UblkUringData::Target as u64);
        let sqe = sqe.user_data(op.user_data);
        loop {
            // SAFETY: the caller keeps every address in the SQE valid until its CQE (this
            // function's contract).
            let pushed = with_task_io_ring_mut(|r| unsafe { r.submission().push(&sqe) }.is_ok());
            if pushed {
                return Ok(op);
            }
            // The SQ is full: hand what is queued to the kernel, then retry.
            if let Err(e) = with_task_io_ring_mut(|r| r.submit()) {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    // The op's slab slot stays allocated: a ring that cannot submit is broken
                    // and the queue is going down anyway.
                    return Err(e);
                }
            }
        }
    }

    fn detach(&self, op: Self::Op, keepalive: Box<dyn Any>) {
        self.orphans.push(op, keepalive);
    }

    fn file_target(&self, file: &Arc<DataFile>) -> FileTarget {
        if file.as_raw_fd() == self.data_fd {
            FileTarget::Fixed(DATA_FIXED_INDEX)
        } else {
            FileTarget::Fd(file.as_raw_fd())
        }
    }
}
