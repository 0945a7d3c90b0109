//! In-memory reference counts of one space (data or metadata blocks).
//!
//! Counts live in memory in the on-disk bitmap layout (2 bits a block) plus an exact map for
//! counts of 3 and above, so lookups and allocation never touch the disk; the store writes
//! dirty bitmaps and the overflow changes back at commit (see `store::commit`).
//!
//! Invariants:
//! - a block freed in a transaction is not handed out again until that transaction's
//!   superblock is durable (`blocked`), so the last committed state is never overwritten;
//! - the 2-bit value is 3 exactly when `overflow` holds the block's count;
//! - `nr_free` of each bitmap counts its zero entries, `nr_allocated` the nonzero ones below
//!   `nr_blocks`.

use crate::error::{Error, Result, Space};
use crate::format::{bitmap_get, bitmap_set, IndexEntry, BITMAP_BYTES, ENTRIES_PER_BITMAP};
use std::collections::{BTreeMap, HashMap};

/// One bitmap block's counts and where it lives on disk.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    pub bits: Box<[u8; BITMAP_BYTES]>,
    /// Location on disk; 0 when it has never been written.
    pub loc: u64,
    /// `loc` was allocated in the current transaction, so it may be written in place.
    pub loc_is_new: bool,
    /// Counts changed since the last commit.
    pub dirty: bool,
    nr_free: u32,
}

impl Bitmap {
    fn new(bits: Box<[u8; BITMAP_BYTES]>, loc: u64) -> Self {
        let nr_free = (0..ENTRIES_PER_BITMAP)
            .filter(|&i| bitmap_get(&bits[..], i) == 0)
            .count();
        Bitmap {
            bits,
            loc,
            loc_is_new: false,
            dirty: false,
            nr_free: nr_free as u32,
        }
    }

    /// The index entry describing this bitmap as it is now.
    pub fn index_entry(&self) -> IndexEntry {
        let first_free = (0..ENTRIES_PER_BITMAP).find(|&i| bitmap_get(&self.bits[..], i) == 0);
        IndexEntry {
            blocknr: self.loc,
            nr_free: self.nr_free,
            none_free_before: first_free.unwrap_or(ENTRIES_PER_BITMAP) as u32,
        }
    }
}

/// Reference counts of one space.
#[derive(Debug)]
pub(crate) struct SpaceMap {
    space: Space,
    nr_blocks: u64,
    pub bitmaps: Vec<Bitmap>,
    overflow: HashMap<u64, u32>,
    /// Changes to the on-disk reference-count tree since the last commit: `Some(count)` to
    /// store, `None` to remove.
    pub overflow_changes: BTreeMap<u64, Option<u32>>,
    /// Root of the on-disk reference-count btree.
    pub ref_count_root: u64,
    /// Data: root of the index btree. Metadata: location of the index block.
    pub bitmap_root: u64,
    /// Metadata: the index block's location was allocated in this transaction.
    pub bitmap_root_is_new: bool,
    /// Bit per block: freed in a transaction whose superblock is not yet durable.
    blocked: Vec<u64>,
    /// Blocks freed in the current transaction.
    freed_current: Vec<u64>,
    /// Blocks freed in the transaction being committed.
    freed_committing: Vec<u64>,
    cursor: u64,
    nr_allocated: u64,
    /// Bit per block: claimed by a caller who will map it (`claim`). A claimed block keeps
    /// count 0, so a commit records it as free, but it is never handed out twice.
    claimed: Vec<u64>,
    nr_claimed: u64,
}

const FREE_MASK: u64 = 0x5555_5555_5555_5555;

impl SpaceMap {
    /// A space map of `nr_blocks` blocks, all free, with no on-disk structures yet.
    pub fn new(space: Space, nr_blocks: u64) -> Self {
        let mut sm = SpaceMap {
            space,
            nr_blocks: 0,
            bitmaps: Vec::new(),
            overflow: HashMap::new(),
            overflow_changes: BTreeMap::new(),
            ref_count_root: 0,
            bitmap_root: 0,
            bitmap_root_is_new: false,
            blocked: Vec::new(),
            freed_current: Vec::new(),
            freed_committing: Vec::new(),
            cursor: 0,
            nr_allocated: 0,
            claimed: Vec::new(),
            nr_claimed: 0,
        };
        sm.extend(nr_blocks);
        sm
    }

    /// A space map rebuilt from what was read from disk: the bitmaps with their locations,
    /// and the reference-count tree's contents. Checks that the two agree.
    pub fn from_disk(
        space: Space,
        nr_blocks: u64,
        bitmaps: Vec<(u64, Box<[u8; BITMAP_BYTES]>)>,
        overflow: HashMap<u64, u32>,
    ) -> Result<Self> {
        let expected = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        if bitmaps.len() != expected {
            return Err(Error::corrupt(
                0,
                format!(
                    "{space} space map has {} bitmaps, expected {expected}",
                    bitmaps.len()
                ),
            ));
        }
        let mut sm = SpaceMap::new(space, 0);
        sm.nr_blocks = nr_blocks;
        sm.bitmaps = bitmaps
            .into_iter()
            .map(|(loc, bits)| Bitmap::new(bits, loc))
            .collect();
        sm.blocked = vec![0; nr_blocks.div_ceil(64) as usize];
        sm.claimed = vec![0; nr_blocks.div_ceil(64) as usize];
        let mut nr_allocated = 0;
        for (i, bm) in sm.bitmaps.iter().enumerate() {
            let loc = bm.loc;
            for e in 0..ENTRIES_PER_BITMAP {
                let b = i as u64 * ENTRIES_PER_BITMAP + e;
                let v = bitmap_get(&bm.bits[..], e);
                if v != 0 && b < nr_blocks {
                    nr_allocated += 1;
                }
                if v == 3 && overflow.get(&b).is_none_or(|&c| c < 3) {
                    return Err(Error::corrupt(
                        loc,
                        format!("{space} block {b} has count 3+ but no valid ref-count entry"),
                    ));
                }
            }
        }
        for (&b, &c) in &overflow {
            if sm.bitmap_value(b) != 3 || c < 3 {
                return Err(Error::corrupt(
                    0,
                    format!("{space} ref-count tree holds block {b} (count {c}) not marked 3"),
                ));
            }
        }
        sm.overflow = overflow;
        sm.nr_allocated = nr_allocated;
        Ok(sm)
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    pub fn nr_free(&self) -> u64 {
        self.nr_blocks - self.nr_allocated
    }

    /// Free blocks nobody has claimed.
    pub fn nr_unclaimed_free(&self) -> u64 {
        self.nr_free() - self.nr_claimed
    }

    /// Claims a free block without counting a reference: it stays free on disk until
    /// `unclaim` and `inc`. `None` when no block is free.
    pub fn claim(&mut self) -> Option<u64> {
        if self.nr_unclaimed_free() == 0 {
            return None;
        }
        let start = self.cursor.min(self.nr_blocks);
        let found = self
            .find_free(start, self.nr_blocks)
            .or_else(|| self.find_free(0, start))?;
        let w = self.claimed.get_mut((found / 64) as usize)?;
        *w |= 1 << (found % 64);
        self.nr_claimed += 1;
        self.cursor = found + 1;
        Some(found)
    }

    pub fn is_claimed(&self, b: u64) -> bool {
        self.claimed
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Drops a claim; false if `b` was not claimed.
    pub fn unclaim(&mut self, b: u64) -> bool {
        if !self.is_claimed(b) {
            return false;
        }
        if let Some(w) = self.claimed.get_mut((b / 64) as usize) {
            *w &= !(1 << (b % 64));
        }
        self.nr_claimed -= 1;
        true
    }

    fn bitmap_value(&self, b: u64) -> u32 {
        let (i, e) = (b / ENTRIES_PER_BITMAP, b % ENTRIES_PER_BITMAP);
        self.bitmaps
            .get(i as usize)
            .map_or(0, |bm| bitmap_get(&bm.bits[..], e))
    }

    /// The reference count of block `b` (0 past the end).
    pub fn get(&self, b: u64) -> u32 {
        match self.bitmap_value(b) {
            3 => self.overflow.get(&b).copied().unwrap_or(3),
            v => v,
        }
    }

    fn check_range(&self, b: u64) -> Result<()> {
        if b >= self.nr_blocks {
            return Err(Error::corrupt(
                b,
                format!(
                    "{} block {b} is past the end ({} blocks)",
                    self.space, self.nr_blocks
                ),
            ));
        }
        Ok(())
    }

    fn set(&mut self, b: u64, old: u32, new: u32) {
        let (i, e) = ((b / ENTRIES_PER_BITMAP) as usize, b % ENTRIES_PER_BITMAP);
        let Some(bm) = self.bitmaps.get_mut(i) else {
            return;
        };
        bitmap_set(&mut bm.bits[..], e, new.min(3));
        bm.dirty = true;
        if old == 0 && new != 0 {
            bm.nr_free -= 1;
            self.nr_allocated += 1;
        } else if old != 0 && new == 0 {
            bm.nr_free += 1;
            self.nr_allocated -= 1;
        }
        if new >= 3 {
            self.overflow.insert(b, new);
            self.overflow_changes.insert(b, Some(new));
        } else if old >= 3 {
            self.overflow.remove(&b);
            self.overflow_changes.insert(b, None);
        }
    }

    /// Adds one reference to `b`.
    pub fn inc(&mut self, b: u64) -> Result<()> {
        self.check_range(b)?;
        let old = self.get(b);
        let new = old.checked_add(1).ok_or_else(|| {
            Error::corrupt(
                b,
                format!("{} block {b} reference count overflows", self.space),
            )
        })?;
        self.set(b, old, new);
        Ok(())
    }

    /// Drops one reference to `b`; returns the new count. A block whose count reaches zero
    /// is not reused before the current transaction commits.
    pub fn dec(&mut self, b: u64) -> Result<u32> {
        self.check_range(b)?;
        let old = self.get(b);
        if old == 0 {
            return Err(Error::corrupt(
                b,
                format!(
                    "{} block {b} is released but its reference count is 0",
                    self.space
                ),
            ));
        }
        self.set(b, old, old - 1);
        if old == 1 {
            self.block(b);
        }
        Ok(old - 1)
    }

    fn block(&mut self, b: u64) {
        if let Some(w) = self.blocked.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
        self.freed_current.push(b);
    }

    fn is_blocked(&self, b: u64) -> bool {
        self.blocked
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Allocates a free block (count becomes 1), searching forward from the last allocation
    /// so that blocks are handed out front to back. `None` when no block is free.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.nr_free() == 0 {
            return None;
        }
        let start = self.cursor.min(self.nr_blocks);
        let found = self
            .find_free(start, self.nr_blocks)
            .or_else(|| self.find_free(0, start))?;
        self.set(found, 0, 1);
        self.cursor = found + 1;
        Some(found)
    }

    /// Claims the run of allocatable blocks (free, not freed by the open transaction, not
    /// claimed) that starts at the first such block at or after `from`, up to `max` long.
    /// Returns `(first, len)`, or `None` when no allocatable block lies at or after `from`.
    pub fn claim_run(&mut self, from: u64, max: u64) -> Option<(u64, u64)> {
        let first = self.find_free(from.min(self.nr_blocks), self.nr_blocks)?;
        let mut len = 0;
        while len < max {
            let b = first + len;
            if b >= self.nr_blocks || self.get(b) != 0 || self.is_blocked(b) || self.is_claimed(b) {
                break;
            }
            if let Some(w) = self.claimed.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            }
            self.nr_claimed += 1;
            len += 1;
        }
        Some((first, len))
    }

    /// The first allocatable block in `[begin, end)`.
    fn find_free(&self, begin: u64, end: u64) -> Option<u64> {
        let mut b = begin;
        while b < end {
            let i = (b / ENTRIES_PER_BITMAP) as usize;
            let bm = self.bitmaps.get(i)?;
            let bitmap_end = ((i as u64 + 1) * ENTRIES_PER_BITMAP).min(end);
            if bm.nr_free == 0 {
                b = bitmap_end;
                continue;
            }
            // 32 entries per 64-bit word; a bit of `free` marks an entry whose count is 0.
            let mut e = b % ENTRIES_PER_BITMAP;
            while i as u64 * ENTRIES_PER_BITMAP + e < bitmap_end {
                let w_idx = (e / 32) as usize;
                let word = bm
                    .bits
                    .get(w_idx * 8..w_idx * 8 + 8)
                    .and_then(|s| <[u8; 8]>::try_from(s).ok())
                    .map_or(u64::MAX, u64::from_le_bytes);
                let mut free = !(word | (word >> 1)) & FREE_MASK;
                free &= u64::MAX << (2 * (e % 32));
                while free != 0 {
                    let j = u64::from(free.trailing_zeros() / 2);
                    let cand = i as u64 * ENTRIES_PER_BITMAP + (e / 32) * 32 + j;
                    if cand >= bitmap_end {
                        break;
                    }
                    if !self.is_blocked(cand) && !self.is_claimed(cand) {
                        return Some(cand);
                    }
                    free &= free - 1;
                }
                e = (e / 32 + 1) * 32;
            }
            b = bitmap_end;
        }
        None
    }

    /// Grows the space to `nr_blocks` (never shrinks). New bitmaps are dirty and unplaced.
    pub fn extend(&mut self, nr_blocks: u64) {
        if nr_blocks <= self.nr_blocks {
            return;
        }
        let needed = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        while self.bitmaps.len() < needed {
            let mut bm = Bitmap::new(Box::new([0u8; BITMAP_BYTES]), 0);
            bm.dirty = true;
            self.bitmaps.push(bm);
        }
        self.nr_blocks = nr_blocks;
        self.blocked.resize(nr_blocks.div_ceil(64) as usize, 0);
        self.claimed.resize(nr_blocks.div_ceil(64) as usize, 0);
    }

    /// The commit of the current transaction has started: its frees stay blocked until
    /// `commit_done`, while the next transaction collects its own.
    pub fn commit_started(&mut self) {
        debug_assert!(self.freed_committing.is_empty(), "commits overlap");
        self.freed_committing = std::mem::take(&mut self.freed_current);
        self.overflow_changes.clear();
        self.bitmap_root_is_new = false;
        for bm in &mut self.bitmaps {
            bm.dirty = false;
            bm.loc_is_new = false;
        }
    }

    /// The committing transaction's superblock is durable: its freed blocks may be reused.
    pub fn commit_done(&mut self) {
        for b in std::mem::take(&mut self.freed_committing) {
            if let Some(w) = self.blocked.get_mut((b / 64) as usize) {
                *w &= !(1 << (b % 64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_above_two_use_the_overflow_map() {
        let mut sm = SpaceMap::new(Space::Data, 100);
        let b = sm.alloc().expect("free block");
        for _ in 0..5 {
            sm.inc(b).expect("inc");
        }
        assert_eq!(sm.get(b), 6);
        assert_eq!(sm.overflow_changes.get(&b), Some(&Some(6)));
        for _ in 0..4 {
            sm.dec(b).expect("dec");
        }
        assert_eq!(sm.get(b), 2);
        assert_eq!(sm.overflow_changes.get(&b), Some(&None));
        assert_eq!(sm.nr_allocated(), 1);
    }

    #[test]
    fn freed_blocks_wait_for_the_commit() {
        let mut sm = SpaceMap::new(Space::Metadata, 3);
        let a = sm.alloc().expect("a");
        let b = sm.alloc().expect("b");
        let c = sm.alloc().expect("c");
        assert_eq!((a, b, c), (0, 1, 2));
        assert!(sm.alloc().is_none());
        sm.dec(b).expect("dec");
        assert_eq!(sm.nr_free(), 1);
        assert!(
            sm.alloc().is_none(),
            "freed this transaction: not reusable yet"
        );
        sm.commit_started();
        assert!(
            sm.alloc().is_none(),
            "still blocked while the commit is in flight"
        );
        sm.commit_done();
        assert_eq!(sm.alloc(), Some(1));
        assert!(
            sm.dec(1).is_ok() && sm.dec(1).is_err(),
            "underflow is an error"
        );
    }

    #[test]
    fn claimed_blocks_stay_free_but_are_not_handed_out_twice() {
        let mut sm = SpaceMap::new(Space::Data, 3);
        let a = sm.claim().expect("a");
        assert_eq!(sm.get(a), 0, "a claim counts no reference");
        assert_eq!((sm.nr_free(), sm.nr_unclaimed_free()), (3, 2));
        let b = sm.alloc().expect("b");
        let c = sm.claim().expect("c");
        assert!(a != b && b != c && a != c);
        assert!(sm.alloc().is_none() && sm.claim().is_none());
        assert!(sm.unclaim(a) && !sm.unclaim(a));
        sm.inc(c).expect("map c");
        assert!(sm.unclaim(c));
        assert_eq!(sm.alloc(), Some(a));
    }

    #[test]
    fn claim_run_takes_only_allocatable_blocks() {
        let mut sm = SpaceMap::new(Space::Data, 10);
        let a = sm.alloc().expect("0");
        let b = sm.alloc().expect("1");
        assert_eq!((a, b), (0, 1));
        sm.claim().expect("2");
        // 3..10 are free: a run from 0 skips the used and claimed blocks.
        assert_eq!(sm.claim_run(0, 4), Some((3, 4)));
        assert_eq!(sm.claim_run(0, 100), Some((7, 3)));
        assert_eq!(sm.claim_run(0, 100), None);
        assert_eq!(sm.nr_unclaimed_free(), 0);
        assert!(sm.unclaim(5));
        assert_eq!(sm.claim_run(4, 100), Some((5, 1)));
    }

    #[test]
    fn allocation_scans_across_bitmaps() {
        let n = ENTRIES_PER_BITMAP * 2 + 10;
        let mut sm = SpaceMap::new(Space::Data, n);
        for expect in 0..n {
            assert_eq!(sm.alloc(), Some(expect));
        }
        assert!(sm.alloc().is_none());
        sm.extend(n + 1);
        assert_eq!(sm.alloc(), Some(n));
    }
}
