//! Block-sized buffers for copies that carry a write (`Thin::break_sharing`), kept for reuse.
//!
//! A partial write to a shared block reads the old block into one of these, lays the write
//! over it and writes the whole block to its new place: one write instead of a copy's write
//! plus the request's own. Allocating the buffer each time would cost more than the merge
//! saves on the CPU (an `IoBuf` is zero-filled: 64 KiB of memset per copy), so finished
//! buffers wait here for the next copy.
//!
//! Invariants: only blocks of at most `MAX_MERGED_COPY_BYTES` are copied this way (larger
//! ones use the device's bounded `copy_block`), and the buffers kept never exceed
//! `MAX_KEPT_BYTES` together. A kept buffer holds stale data of some thin; it is handed out
//! only to be filled by a whole-block read, and written nowhere unless that read succeeded.

use block_io::data::IoBuf;
use parking_lot::Mutex;

/// Largest data block copied through one buffer with the write merged in (the same bound as
/// block-io's copy chunk): a bigger block would pin that much memory per request in flight.
pub(crate) const MAX_MERGED_COPY_BYTES: u64 = 1 << 20;

/// Most memory the kept buffers hold together.
const MAX_KEPT_BYTES: usize = 4 << 20;

/// Kept block buffers, all of the pool's block size.
#[derive(Debug)]
pub(crate) struct CopyBufs {
    block_size: usize,
    max_kept: usize,
    kept: Mutex<Vec<IoBuf>>,
}

impl CopyBufs {
    pub fn new(block_size_bytes: u64) -> CopyBufs {
        let merge = block_size_bytes <= MAX_MERGED_COPY_BYTES;
        let block_size = block_size_bytes as usize;
        CopyBufs {
            block_size,
            max_kept: if merge {
                MAX_KEPT_BYTES / block_size.max(1)
            } else {
                0
            },
            kept: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of one whole block (contents stale), or `None` when blocks are too large to
    /// copy this way.
    pub fn take(&self) -> Option<IoBuf> {
        if self.max_kept == 0 {
            return None;
        }
        let kept = self.kept.lock().pop();
        Some(kept.unwrap_or_else(|| IoBuf::new(self.block_size)))
    }

    /// Keeps `buf` for the next copy, unless enough are kept already.
    pub fn put(&self, mut buf: IoBuf) {
        if buf.capacity() < self.block_size {
            return;
        }
        buf.set_len(self.block_size);
        let mut kept = self.kept.lock();
        if kept.len() < self.max_kept {
            kept.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CopyBufs, MAX_KEPT_BYTES, MAX_MERGED_COPY_BYTES};

    #[test]
    fn keeps_a_bounded_number_of_whole_block_buffers() {
        let bufs = CopyBufs::new(64 << 10);
        let taken: Vec<_> = (0..100).map(|_| bufs.take().unwrap()).collect();
        assert!(taken.iter().all(|b| b.len() == 64 << 10));
        for b in taken {
            bufs.put(b);
        }
        assert_eq!(bufs.kept.lock().len(), MAX_KEPT_BYTES / (64 << 10));
        let mut b = bufs.take().unwrap();
        b.set_len(4096);
        bufs.put(b);
        assert!(bufs.kept.lock().iter().all(|b| b.len() == 64 << 10));
    }

    #[test]
    fn large_blocks_are_not_copied_through_one_buffer() {
        assert!(CopyBufs::new(MAX_MERGED_COPY_BYTES).take().is_some());
        assert!(CopyBufs::new(MAX_MERGED_COPY_BYTES * 2).take().is_none());
    }
}
