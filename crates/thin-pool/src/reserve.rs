//! The pre-zeroed reserve: data blocks zeroed ahead of need, so that a partial first write
//! takes one and writes at once instead of zeroing the rest of its block first.
//!
//! Following the seed's suggestion, reserve blocks are mapped into a hidden thin
//! (`RESERVE_THIN`, dm-thin's largest device id): the space maps count them as used, every
//! commit records them, `thin_check` sees a thin like any other, and the kernel's dm-thin sees
//! one more thin. A block is mapped there only after its zeroing completed; the commit that
//! records the mapping flushes the data device first, so the zeros are durable with it.
//!
//! A writer takes a block from the ready list (in memory only), writes its data, and then
//! moves the mapping from the reserve thin to its own thin in one metadata change
//! (`move_mapping`), so no commit ever sees the block unmapped. If the pool crashes between
//! the data write and the move, the last commit still shows the block in the reserve
//! although its data is no longer zero. So the reserve found at open is *unverified*: the
//! background zeroes those blocks again before handing any of them out. Zeroing a few dozen
//! blocks at open is the whole cost, and no restart or crash can ever hand out a block that
//! is not known to be zero. A block whose writer failed goes back the same way.

use std::collections::VecDeque;

use parking_lot::Mutex;
use thin_metadata::{DataBlock, ThinId, ThinMetadata, VBlock, MAX_THIN_ID};

/// The hidden thin holding the reserve.
pub const RESERVE_THIN: ThinId = ThinId(MAX_THIN_ID);
/// Deleted thins are parked under ids from here up to `RESERVE_THIN` while the background
/// frees their blocks.
pub const FIRST_TRASH_ID: u32 = MAX_THIN_ID - 256;
/// Ids at or above this are the pool's own; users cannot create, open or delete them.
pub const FIRST_RESERVED_ID: u32 = FIRST_TRASH_ID;

#[derive(Debug, Default)]
pub(crate) struct Reserve {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Zeroed blocks mapped into `RESERVE_THIN` (key, block), oldest first.
    ready: VecDeque<(u64, DataBlock)>,
    /// Blocks found in `RESERVE_THIN` at open, to be zeroed again before use.
    unverified: Vec<(u64, DataBlock)>,
    /// Blocks the background is zeroing right now.
    in_flight: u64,
    /// The next unused key in `RESERVE_THIN`.
    next_key: u64,
}

impl Reserve {
    /// Loads the reserve thin's mappings as unverified blocks.
    pub fn load(meta: &ThinMetadata) -> thin_metadata::Result<Reserve> {
        let mut st = State::default();
        if meta.thins().contains(&RESERVE_THIN) {
            meta.for_each_mapping(RESERVE_THIN, VBlock(0), |v, d, _| {
                st.unverified.push((v.0, d));
                st.next_key = v.0 + 1;
                true
            })?;
        }
        Ok(Reserve {
            state: Mutex::new(st),
        })
    }

    /// Zeroed blocks ready now.
    pub fn nr_ready(&self) -> u64 {
        self.state.lock().ready.len() as u64
    }

    /// Blocks ready, being zeroed, or waiting for re-zeroing: what refills count against.
    pub fn nr_held(&self) -> u64 {
        let st = self.state.lock();
        st.ready.len() as u64 + st.in_flight + st.unverified.len() as u64
    }

    /// Takes a zeroed block (key, block): it stays mapped in the reserve thin until the taker
    /// moves it with `ThinMetadata::move_mapping` or gives it back with `dirty`.
    pub fn take(&self) -> Option<(u64, DataBlock)> {
        self.state.lock().ready.pop_front()
    }

    /// A taken block that was written but not moved: zero it again before reuse.
    pub fn dirty(&self, key: u64, block: DataBlock) {
        self.state.lock().unverified.push((key, block));
    }

    /// Takes up to `max` unverified blocks for re-zeroing (they stay mapped meanwhile).
    pub fn take_unverified(&self, max: usize) -> Vec<(u64, DataBlock)> {
        let mut st = self.state.lock();
        let n = st.unverified.len().min(max);
        let start = st.unverified.len() - n;
        let out: Vec<_> = st.unverified.drain(start..).collect();
        st.in_flight += out.len() as u64;
        out
    }

    /// Re-zeroed unverified blocks become ready (still mapped under their keys).
    pub fn verified(&self, blocks: &[(u64, DataBlock)]) {
        let mut st = self.state.lock();
        st.in_flight -= blocks.len() as u64;
        st.ready.extend(blocks.iter().copied());
    }

    /// Unverified blocks whose zeroing failed go back to wait for another try.
    pub fn unverified_again(&self, blocks: &[(u64, DataBlock)]) {
        let mut st = self.state.lock();
        st.in_flight -= blocks.len() as u64;
        st.unverified.extend(blocks.iter().copied());
    }

    /// Counts `n` fresh blocks as being zeroed, and hands out their keys.
    pub fn begin_refill(&self, n: u64) -> u64 {
        let mut st = self.state.lock();
        st.in_flight += n;
        let first = st.next_key;
        st.next_key += n;
        first
    }

    /// Ends a refill of `n` blocks, of which `mapped` were zeroed and mapped.
    pub fn end_refill(&self, n: u64, mapped: &[(u64, DataBlock)]) {
        let mut st = self.state.lock();
        st.in_flight -= n;
        st.ready.extend(mapped.iter().copied());
    }

    /// Forgets everything in memory (after the metadata was reloaded by an abort).
    pub fn reload(&self, meta: &ThinMetadata) {
        match Reserve::load(meta) {
            Ok(fresh) => {
                let mut st = self.state.lock();
                let in_flight = st.in_flight;
                *st = fresh.state.into_inner();
                st.in_flight = in_flight;
            }
            Err(e) => tracing::error!("reloading the reserve failed: {e}"),
        }
    }
}
