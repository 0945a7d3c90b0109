//! `IoBuf`: an owned, page-aligned I/O buffer.
//!
//! Data I/O takes buffers by value and hands them back with the result (`BufResult`). While an
//! operation runs, the engine owns the buffer, so the caller holds no `&`/`&mut` to memory the
//! kernel may be writing: the type system, not caller discipline, keeps the two apart. If the
//! caller drops the future of an operation whose SQE is in flight, the buffer moves into the
//! ring's record of that SQE and is freed only when its CQE arrives (see `rt::ring`).
//!
//! Invariants: the allocation is `IO_BUF_ALIGN`-aligned (O_DIRECT-safe for every logical block
//! size up to 4 KiB) and its capacity is a whole number of `IO_BUF_ALIGN` units, never zero;
//! `len <= capacity`; the memory is freed exactly once, by `Drop`, and only by the last owner
//! (there is only ever one).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment (and capacity granularity) of every `IoBuf`, in bytes.
pub const IO_BUF_ALIGN: usize = 4096;

/// Largest buffer one `IoBuf` may hold. A data block is at most 1 GiB (dm-thin's limit), and
/// nothing here needs a single buffer larger than one block.
pub const MAX_IO_BUF_BYTES: usize = 1 << 30;

/// An owned, zero-initialised, `IO_BUF_ALIGN`-aligned byte buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an `IoBuf` is the unique owner of its allocation (no aliasing handle exists), like a
// `Box<[u8]>`; moving it to another thread moves that ownership.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is `Sync`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    ///
    /// # Panics
    /// If `len` exceeds `MAX_IO_BUF_BYTES`, or the allocation fails (like `Vec`).
    pub fn new(len: usize) -> Self {
        assert!(
            len <= MAX_IO_BUF_BYTES,
            "IoBuf of {len} bytes exceeds the {MAX_IO_BUF_BYTES}-byte limit"
        );
        let capacity = len.div_ceil(IO_BUF_ALIGN).max(1) * IO_BUF_ALIGN;
        let layout = match Layout::from_size_align(capacity, IO_BUF_ALIGN) {
            Ok(layout) => layout,
            // Unreachable: capacity <= 1 GiB + 4 KiB and the alignment is a power of two.
            Err(e) => panic!("IoBuf layout for {capacity} bytes: {e}"),
        };
        // SAFETY: `layout` has a non-zero size (capacity >= IO_BUF_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, layout }
    }

    /// A buffer of `len` bytes, each set to `byte`.
    pub fn filled(len: usize, byte: u8) -> Self {
        let mut buf = Self::new(len);
        buf.fill(byte);
        buf
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = Self::new(bytes.len());
        buf.copy_from_slice(bytes);
        buf
    }

    /// Bytes in use: what an I/O with this buffer transfers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated: the most `set_len` may grow to.
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Changes the length within the capacity, so one allocation can serve I/Os of several
    /// sizes. Bytes that come into view keep whatever they last held.
    ///
    /// # Panics
    /// If `len > capacity()`.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "IoBuf::set_len({len}) beyond capacity {}",
            self.capacity()
        );
        self.len = len;
    }

    /// Pointer to the first byte, for building an SQE. Stays valid while `self` lives, even
    /// if `self` is moved: the memory is on the heap.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `capacity >= len` initialised (zeroed at allocation) bytes
        // owned by `self`, and `&self` forbids a concurrent `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(self.layout)` and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable() {
        let mut buf = IoBuf::new(5000);
        assert_eq!(buf.as_ptr() as usize % IO_BUF_ALIGN, 0);
        assert_eq!(buf.capacity(), 8192);
        assert!(buf.iter().all(|&b| b == 0));
        buf.fill(7);
        buf.set_len(8192);
        assert_eq!(buf[4999], 7);
        assert_eq!(buf[5000], 0);
        let empty = IoBuf::new(0);
        assert!(empty.is_empty());
        assert_eq!(empty.capacity(), IO_BUF_ALIGN);
    }
}
