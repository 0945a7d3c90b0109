//! Recomputed reference counts of one space.
//!
//! Invariants: memory is bounded by the space's size only while that is small
//! (`DENSE_LIMIT_BLOCKS`, one byte a block); a larger space (a data device of billions of
//! blocks) is counted sparsely, so memory follows the number of referenced blocks, which the
//! metadata size bounds. Blocks at or past `nr_blocks` are never counted: callers report
//! them as out of range instead.

use std::collections::HashMap;

/// Largest space counted with one byte a block (256 MiB of counts).
const DENSE_LIMIT_BLOCKS: u64 = 1 << 28;
/// A dense count of this value means "see `overflow`".
const DENSE_OVERFLOW: u8 = u8::MAX;

#[derive(Debug)]
pub(super) struct RefCounter {
    nr_blocks: u64,
    /// One count a block while the space is small; empty otherwise.
    dense: Vec<u8>,
    /// Exact counts of dense blocks at `DENSE_OVERFLOW` and above, or every count of a
    /// sparse space.
    overflow: HashMap<u64, u32>,
    sparse: bool,
    nr_nonzero: u64,
}

impl RefCounter {
    pub fn new(nr_blocks: u64) -> Self {
        let sparse = nr_blocks > DENSE_LIMIT_BLOCKS;
        let dense = if sparse {
            Vec::new()
        } else {
            vec![0u8; usize::try_from(nr_blocks).unwrap_or(0)]
        };
        RefCounter {
            nr_blocks,
            dense,
            overflow: HashMap::new(),
            sparse,
            nr_nonzero: 0,
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Adds one reference to `b`; returns false (counting nothing) when `b` is out of range.
    pub fn inc(&mut self, b: u64) -> bool {
        if b >= self.nr_blocks {
            return false;
        }
        if self.get(b) == 0 {
            self.nr_nonzero += 1;
        }
        if self.sparse {
            let c = self.overflow.entry(b).or_insert(0);
            *c = c.saturating_add(1);
            return true;
        }
        let Some(slot) = usize::try_from(b).ok().and_then(|i| self.dense.get_mut(i)) else {
            return false;
        };
        if *slot < DENSE_OVERFLOW - 1 {
            *slot += 1;
        } else if *slot == DENSE_OVERFLOW - 1 {
            *slot = DENSE_OVERFLOW;
            self.overflow.insert(b, u32::from(DENSE_OVERFLOW));
        } else {
            let c = self.overflow.entry(b).or_insert(u32::from(DENSE_OVERFLOW));
            *c = c.saturating_add(1);
        }
        true
    }

    /// The count of `b` (0 when out of range).
    pub fn get(&self, b: u64) -> u32 {
        if self.sparse {
            return self.overflow.get(&b).copied().unwrap_or(0);
        }
        match usize::try_from(b).ok().and_then(|i| self.dense.get(i)) {
            None => 0,
            Some(&DENSE_OVERFLOW) => self.overflow.get(&b).copied().unwrap_or(0),
            Some(&c) => u32::from(c),
        }
    }

    /// True when blocks `first..first + n` all have count 0.
    pub fn all_zero(&self, first: u64, n: u64) -> bool {
        let dense = usize::try_from(first)
            .ok()
            .zip(usize::try_from(first.saturating_add(n)).ok())
            .and_then(|(a, b)| self.dense.get(a..b));
        match dense {
            Some(counts) if !self.sparse => counts.iter().all(|&c| c == 0),
            _ => (first..first.saturating_add(n)).all(|b| self.get(b) == 0),
        }
    }

    /// Blocks with a nonzero count.
    pub fn nr_nonzero(&self) -> u64 {
        self.nr_nonzero
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_a_byte_and_ignores_out_of_range() {
        let mut c = RefCounter::new(10);
        for _ in 0..300 {
            assert!(c.inc(3));
        }
        assert!(c.inc(4));
        assert!(!c.inc(10));
        assert_eq!((c.get(3), c.get(4), c.get(5), c.get(99)), (300, 1, 0, 0));
        assert_eq!(c.nr_nonzero(), 2);
        let mut s = RefCounter::new(DENSE_LIMIT_BLOCKS * 4);
        assert!(s.inc(DENSE_LIMIT_BLOCKS * 3) && s.inc(DENSE_LIMIT_BLOCKS * 3));
        assert_eq!(s.get(DENSE_LIMIT_BLOCKS * 3), 2);
        assert_eq!(s.nr_nonzero(), 1);
    }
}
