//! What a lock is taken on, and in which mode.
//!
//! Invariants:
//! - `Mode::conflicts` is symmetric; every grant decision in the crate goes through it, so the
//!   compatibility table below is the single definition of what may run together.
//! - A virtual key and a data key never compare equal, even with equal numbers: they are two
//!   address spaces.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A thin device's id inside its pool (dm-thin's 24-bit dev id fits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThinId(pub u32);

/// A block number in a thin device's virtual address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VBlock(pub u64);

/// A block number on the pool's data device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DBlock(pub u64);

/// `Key::words`' first word for a data key: above every thin id.
const DATA_TAG: u64 = 1 << 32;

/// The thing a single-block lock protects.
///
/// Ranges of virtual blocks and whole thins are locked with
/// [`Prison::exclusive_range`](crate::Prison::exclusive_range) and
/// [`Prison::exclusive_thin`](crate::Prison::exclusive_thin), which conflict with every
/// `Key::Virtual` they cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// One block of one thin: what a bio addresses.
    Virtual(ThinId, VBlock),
    /// One pool data block: what a copy or a discard passdown touches.
    Data(DBlock),
}

impl Key {
    /// Shorthand for `Key::Virtual(ThinId(thin), VBlock(vblock))`.
    pub fn virt(thin: u32, vblock: u64) -> Key {
        Key::Virtual(ThinId(thin), VBlock(vblock))
    }

    /// Shorthand for `Key::Data(DBlock(dblock))`.
    pub fn data(dblock: u64) -> Key {
        Key::Data(DBlock(dblock))
    }

    /// The key packed into two words: the tag and thin in the first, the block in the second.
    #[inline]
    fn words(self) -> (u64, u64) {
        match self {
            Key::Virtual(ThinId(thin), VBlock(vblock)) => (u64::from(thin), vblock),
            Key::Data(DBlock(dblock)) => (DATA_TAG, dblock),
        }
    }

    /// The key in one word, for the lock-free slots: a data block below 2^63 with the top
    /// bit set, or a thin id below 2^23 and a virtual block below 2^40 (2^56 bytes of thin
    /// at the smallest block size) with it clear. `None` beyond that.
    #[inline(always)]
    pub(crate) fn packed(self) -> Option<u64> {
        match self {
            Key::Virtual(ThinId(thin), VBlock(vblock)) => {
                (thin < 1 << 23 && vblock < 1 << 40).then(|| u64::from(thin) << 40 | vblock)
            }
            Key::Data(DBlock(dblock)) => (dblock < 1 << 63).then_some(1 << 63 | dblock),
        }
    }

    /// The key `packed` packed.
    pub(crate) fn unpack(word: u64) -> Key {
        if word >> 63 == 1 {
            Key::data(word & !(1 << 63))
        } else {
            Key::virt((word >> 40) as u32, word & ((1 << 40) - 1))
        }
    }

    /// The key's hash: computed once per request, it picks both the shard (`shard_of`) and
    /// the bucket inside the shard's table (`Hashed`).
    ///
    /// Keys come from the kernel's request stream, not from an adversary who could flood one
    /// bucket, and the table only holds locks in use and a bounded number of idle ones, so
    /// SipHash's cost buys nothing here: two multiplies (Fibonacci hashing, as FxHash does)
    /// and a fold of the high half into the low, so that the low bits (bucket), the top seven
    /// (the table's control byte) and bits 40 and up (shard) all depend on every input bit.
    #[inline]
    pub(crate) fn hash64(self) -> u64 {
        let (tag, block) = self.words();
        let h =
            (block ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^ (h >> 29)
    }

    /// Which shard of `nr_shards` (a power of two) holds this key's cell.
    #[cfg(test)]
    pub(crate) fn shard(self, nr_shards: usize) -> usize {
        shard_of(self.hash64(), nr_shards)
    }
}

/// Which shard of `nr_shards` (a power of two) holds the cell of a key hashing to `hash`.
#[inline]
pub(crate) fn shard_of(hash: u64, nr_shards: usize) -> usize {
    // Bits 40 and up: the low ones pick the bucket inside the shard and the top seven the
    // table's control byte, so the three stay independent.
    (hash >> 40) as usize & (nr_shards - 1)
}

/// A key with its hash, as a shard's table stores it: the table reuses the hash instead of
/// hashing the key again (`PassHasher`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hashed {
    pub(crate) hash: u64,
    pub(crate) key: Key,
}

impl Hashed {
    #[inline]
    pub(crate) fn new(key: Key) -> Hashed {
        Hashed {
            hash: key.hash64(),
            key,
        }
    }
}

impl Hash for Hashed {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hands `Hashed`'s precomputed hash to the table unchanged.
#[derive(Default, Debug)]
pub(crate) struct PassHasher(u64);

pub(crate) type BuildPassHasher = BuildHasherDefault<PassHasher>;

impl Hasher for PassHasher {
    fn write(&mut self, _bytes: &[u8]) {
        unreachable!("PassHasher only takes Hashed's u64");
    }

    #[inline]
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (tag, block) = self.words();
        state.write_u64(tag);
        state.write_u64(block);
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Virtual(thin, vblock) => write!(f, "thin {} vblock {}", thin.0, vblock.0),
            Key::Data(dblock) => write!(f, "data block {}", dblock.0),
        }
    }
}

/// What a shared holder does to the block while it holds the lock.
///
/// An exclusive lock's [`Level`] says which accesses it keeps out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads the block; kept out only by [`Level::ReadWrite`].
    Read = 0,
    /// Writes the block; kept out by every level.
    Write = 1,
}

/// How much an exclusive lock keeps out (bio-prison v2's lock levels).
///
/// Levels are ordered: `Write < ReadWrite`. An exclusive holder at `Write` lets shared readers
/// in (a copy out of the block can proceed beside them); promoting to `ReadWrite` waits for
/// those readers to drain and keeps new ones out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Keeps out writers, upgradable and exclusive holders; readers run on.
    Write = 0,
    /// Keeps out everyone.
    ReadWrite = 1,
}

impl Level {
    /// Whether an exclusive holder at this level keeps out a shared holder doing `access`.
    pub fn blocks(self, access: Access) -> bool {
        match (self, access) {
            (Level::ReadWrite, _) | (Level::Write, Access::Write) => true,
            (Level::Write, Access::Read) => false,
        }
    }
}

/// The mode in which a request holds, or waits for, a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    Shared(Access),
    /// Coexists with shared holders; at most one; the only shared-like mode that may upgrade.
    Upgradable,
    Exclusive(Level),
}

/// Number of distinct `Mode`s, for per-mode counters.
pub(crate) const NR_MODES: usize = 5;

pub(crate) const ALL_MODES: [Mode; NR_MODES] = [
    Mode::Shared(Access::Read),
    Mode::Shared(Access::Write),
    Mode::Upgradable,
    Mode::Exclusive(Level::Write),
    Mode::Exclusive(Level::ReadWrite),
];

impl Mode {
    /// Position of this mode in `ALL_MODES`.
    pub(crate) fn index(self) -> usize {
        match self {
            Mode::Shared(Access::Read) => 0,
            Mode::Shared(Access::Write) => 1,
            Mode::Upgradable => 2,
            Mode::Exclusive(Level::Write) => 3,
            Mode::Exclusive(Level::ReadWrite) => 4,
        }
    }

    /// The compatibility table.
    ///
    /// |            | Sh(R) | Sh(W) | Upg | Ex(W) | Ex(RW) |
    /// |------------|-------|-------|-----|-------|--------|
    /// | Sh(R)      |       |       |     |       |   x    |
    /// | Sh(W)      |       |       |     |   x   |   x    |
    /// | Upg        |       |       |  x  |   x   |   x    |
    /// | Ex(W)      |       |   x   |  x  |   x   |   x    |
    /// | Ex(RW)     |   x   |   x   |  x  |   x   |   x    |
    pub(crate) fn conflicts(self, other: Mode) -> bool {
        match (self, other) {
            (Mode::Shared(_), Mode::Shared(_) | Mode::Upgradable)
            | (Mode::Upgradable, Mode::Shared(_)) => false,
            (Mode::Shared(access), Mode::Exclusive(level))
            | (Mode::Exclusive(level), Mode::Shared(access)) => level.blocks(access),
            (Mode::Upgradable | Mode::Exclusive(_), Mode::Upgradable | Mode::Exclusive(_)) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_is_symmetric_and_matches_levels() {
        for a in ALL_MODES {
            for b in ALL_MODES {
                assert_eq!(a.conflicts(b), b.conflicts(a), "{a:?} vs {b:?}");
            }
            assert_eq!(ALL_MODES[a.index()], a);
        }
        assert!(!Mode::Shared(Access::Read).conflicts(Mode::Exclusive(Level::Write)));
        assert!(Mode::Shared(Access::Read).conflicts(Mode::Exclusive(Level::ReadWrite)));
        assert!(Mode::Shared(Access::Write).conflicts(Mode::Exclusive(Level::Write)));
        assert!(!Mode::Upgradable.conflicts(Mode::Shared(Access::Write)));
        assert!(Mode::Upgradable.conflicts(Mode::Upgradable));
    }

    #[test]
    fn shards_spread_consecutive_blocks() {
        let mut seen = [0usize; 16];
        for vblock in 0..1600 {
            seen[Key::virt(7, vblock).shard(16)] += 1;
        }
        assert!(seen.iter().all(|&n| (60..140).contains(&n)), "{seen:?}");
        assert_ne!(Key::virt(0, 5), Key::data(5));
    }

    #[test]
    fn keys_pack_exactly_or_not_at_all() {
        let fits = [
            Key::virt(0, 0),
            Key::virt((1 << 23) - 1, (1 << 40) - 1),
            Key::data(0),
            Key::data((1 << 63) - 1),
        ];
        for key in fits {
            assert_eq!(key.packed().map(Key::unpack), Some(key));
        }
        assert_ne!(Key::virt(0, 5).packed(), Key::data(5).packed());
        for key in [
            Key::virt(1 << 23, 0),
            Key::virt(0, 1 << 40),
            Key::data(1 << 63),
        ] {
            assert_eq!(key.packed(), None, "{key}");
        }
    }
}
