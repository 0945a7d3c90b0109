//! The lock-free fast path: each shard's table of slots, each binding one key to one atomic
//! word that counts its holders.
//!
//! An uncontended lock is one compare-and-swap on the key's word and its release one
//! fetch-and-sub; neither takes the shard's mutex. Everything else (waiting, conversions that
//! must wait, range and thin locks, keys that find no slot) is the `Core`'s, under the mutex.
//!
//! The word: shared holders by access (`R`, `W`, counts), `UPG` (the upgradable holder),
//! `EX_W`/`EX_RW` (the exclusive holder and its level), `SLOW`, `VACANT`, and a generation.
//!
//! Invariants:
//! - A slot holds a key packed into one word (`Key::packed`), so that four slots share a
//!   cache line; a key that does not pack (a thin id or block beyond any real pool) never
//!   binds, and is locked in a cell.
//! - A key is *bound* to at most one slot of its bucket, and then either the slot alone
//!   accounts for its holders (*open*: `SLOW` clear) or the slot is *sealed* (`SLOW` set) and
//!   the key has a `Core` cell whose `slot` names it. Only the shard's mutex holder binds,
//!   seals, unseals or vacates a slot, and it writes the key words only while the slot is
//!   `VACANT`.
//! - An open slot's key has no cell, no waiter, no pending conversion and no range or thin lock
//!   covering it: so the fast path may grant whatever the word's holders allow, first come,
//!   first served being trivially kept.
//! - Outside the mutex a word changes only by compare-and-swap from an open, bound state that
//!   the change keeps self-consistent (an acquire, an upgrade, a conversion, a downgrade), or by
//!   a holder's release (fetch-and-sub, open or sealed). So the fast path never changes a sealed
//!   or vacant word except to release, and a release that finds the slot sealed reports to the
//!   `Core` under the mutex.
//! - Sealing copies the word's holders into the new cell at the instant `SLOW` is set (the
//!   fetch-or's result): from then on the cell counts every hold of the key, including those of
//!   guards still pointing at the slot, until they report their release. So the cell falls
//!   unused only once the slot's counts are zero, and then the slot is unsealed (or vacated,
//!   under a covering range lock).
//! - Every change of a slot's key first makes it `VACANT` with a new generation, so a fast-path
//!   acquire that read the old key fails its compare-and-swap instead of locking another key.

use crate::key::{Access, Hashed, Key, Level, Mode};
use crate::sync::{AtomicU64, Ordering};

/// Slots per bucket (one cache line): a key may sit in any of them.
pub(crate) const WAYS: usize = 4;

/// Index of a slot in its shard's table.
pub(crate) type SlotId = u32;

const FIELD_BITS: u32 = 18;
const R_ONE: u64 = 1;
const R_MASK: u64 = (1 << FIELD_BITS) - 1;
const W_ONE: u64 = 1 << FIELD_BITS;
const W_MASK: u64 = R_MASK << FIELD_BITS;
const UPG: u64 = 1 << (2 * FIELD_BITS);
const EX_W: u64 = UPG << 1;
const EX_RW: u64 = UPG << 2;
/// The key's `Core` cell (or a covering range lock) decides: the fast path must not grant.
pub(crate) const SLOW: u64 = UPG << 3;
/// No key is bound.
const VACANT: u64 = UPG << 4;
const GEN_ONE: u64 = UPG << 5;
const GEN_MASK: u64 = !(GEN_ONE - 1);
const HOLDERS: u64 = R_MASK | W_MASK | UPG | EX_W | EX_RW;

/// The word's increment for one holder in `mode`.
#[inline(always)]
pub(crate) fn one(mode: Mode) -> u64 {
    match mode {
        Mode::Shared(Access::Read) => R_ONE,
        Mode::Shared(Access::Write) => W_ONE,
        Mode::Upgradable => UPG,
        Mode::Exclusive(Level::Write) => EX_W,
        Mode::Exclusive(Level::ReadWrite) => EX_RW,
    }
}

/// The holder bits a request in `mode` conflicts with (`Mode::conflicts`, as bits), plus those
/// that send any request to the slow path.
#[inline(always)]
fn refused_by(mode: Mode) -> u64 {
    SLOW | VACANT
        | match mode {
            Mode::Shared(Access::Read) => EX_RW,
            Mode::Shared(Access::Write) => EX_W | EX_RW,
            Mode::Upgradable => UPG | EX_W | EX_RW,
            Mode::Exclusive(Level::Write) => W_MASK | UPG | EX_W | EX_RW,
            Mode::Exclusive(Level::ReadWrite) => HOLDERS,
        }
}

/// Whether one more shared holder in `mode` would overflow its count (the cell has room).
#[inline(always)]
fn saturated(word: u64, mode: Mode) -> bool {
    match mode {
        Mode::Shared(Access::Read) => word & R_MASK == R_MASK,
        Mode::Shared(Access::Write) => word & W_MASK == W_MASK,
        _ => false,
    }
}

/// Whether the shared holders an exclusive lock at `target` must outlast are gone.
#[inline(always)]
fn drained(word: u64, target: Level) -> bool {
    let blocking = match target {
        Level::Write => W_MASK,
        Level::ReadWrite => R_MASK | W_MASK,
    };
    word & blocking == 0
}

fn next_gen(word: u64) -> u64 {
    (word & GEN_MASK).wrapping_add(GEN_ONE) & GEN_MASK
}

/// The holders a word records, decoded for a `Core` cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Holders {
    pub(crate) nr_shared: [u32; 2],
    pub(crate) upgradable: bool,
    pub(crate) exclusive: Option<Level>,
}

impl Holders {
    pub(crate) fn of(word: u64) -> Holders {
        Holders {
            nr_shared: [
                (word & R_MASK) as u32,
                ((word & W_MASK) >> FIELD_BITS) as u32,
            ],
            upgradable: word & UPG != 0,
            exclusive: if word & EX_RW != 0 {
                Some(Level::ReadWrite)
            } else if word & EX_W != 0 {
                Some(Level::Write)
            } else {
                None
            },
        }
    }

    pub(crate) fn count(&self) -> u32 {
        self.nr_shared[0]
            + self.nr_shared[1]
            + u32::from(self.upgradable)
            + u32::from(self.exclusive.is_some())
    }
}

/// One slot: the holder word and the bound key, packed (`Key::packed`).
#[derive(Debug)]
pub(crate) struct Slot {
    word: AtomicU64,
    key: AtomicU64,
}

/// Slots that share a cache line; a key's hash picks its bucket.
#[derive(Debug)]
#[repr(align(64))]
struct Bucket([Slot; WAYS]);

impl Slot {
    /// Adds a holder in `mode` if the slot is open, still bound as in `word` (its last seen
    /// state), and its holders allow it.
    #[inline(always)]
    fn try_hold(&self, mut word: u64, mode: Mode) -> bool {
        loop {
            if word & refused_by(mode) != 0 || saturated(word, mode) {
                return false;
            }
            match self.word.compare_exchange(
                word,
                word + one(mode),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                // Another key now, or sealed: the slow path looks again.
                Err(now) if now & GEN_MASK != word & GEN_MASK => return false,
                Err(now) => word = now,
            }
        }
    }

    /// A holder in `mode` lets go; true if the slot is sealed, so the `Core` must hear of it.
    #[inline(always)]
    pub(crate) fn release(&self, mode: Mode) -> bool {
        self.word.fetch_sub(one(mode), Ordering::AcqRel) & SLOW != 0
    }

    /// Changes one holder from `from` to `to` if the slot is open and `allowed(word)`;
    /// `Sealed` if the slot is sealed, `NotNow` if not allowed.
    #[inline(always)]
    fn try_change(&self, from: Mode, to: Mode, allowed: impl Fn(u64) -> bool) -> Fast {
        let slot = self;
        let mut word = slot.word.load(Ordering::Acquire);
        loop {
            if word & SLOW != 0 || saturated(word, to) {
                return Fast::Sealed;
            }
            if !allowed(word) {
                return Fast::NotNow;
            }
            let new = word - one(from) + one(to);
            match slot
                .word
                .compare_exchange(word, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Fast::Done,
                Err(now) => word = now,
            }
        }
    }

    /// A shared holder becomes the upgradable one (`NotNow`: another is upgradable or
    /// exclusive). An open slot has no covering range lock, so nothing else can refuse it.
    pub(crate) fn try_upgradable(&self, access: Access) -> Fast {
        self.try_change(Mode::Shared(access), Mode::Upgradable, |w| {
            w & (UPG | EX_W | EX_RW) == 0
        })
    }

    /// The upgradable or exclusive holder (in `from`) becomes exclusive at `target`, if the
    /// shared holders that conflict with it have drained (`NotNow`: it must wait).
    pub(crate) fn try_convert(&self, from: Mode, target: Level) -> Fast {
        self.try_change(from, Mode::Exclusive(target), |w| drained(w, target))
    }

    /// The upgradable or exclusive holder (in `from`) becomes shared doing `access`. On an open
    /// slot nobody waits, so nobody needs waking.
    pub(crate) fn try_downgrade(&self, from: Mode, access: Access) -> Fast {
        self.try_change(from, Mode::Shared(access), |_| true)
    }
}

/// A fast-path conversion's outcome.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fast {
    Done,
    /// The conversion must wait (or be refused): the `Core` decides.
    NotNow,
    /// Sealed: the `Core` accounts for this key.
    Sealed,
}

/// A shard's slot table. Its size is fixed at creation; with `bindable` false (a prison
/// created with no idle cells) it has one bucket that stays vacant and everything goes
/// through the `Core`. The shard and its core each keep a handle (a clone) on the same
/// buckets, so that the fast path reaches a bucket in one load from the shard.
///
/// std's `Arc` even under loom: it only shares the memory, whose atomics are loom's.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    buckets: std::sync::Arc<[Bucket]>,
    mask: usize,
    bindable: bool,
}

impl Slots {
    /// A table of at least `nr_slots` slots (whole buckets, a power of two of them).
    pub(crate) fn new(nr_slots: usize) -> Slots {
        let nr_buckets = nr_slots.div_ceil(WAYS).max(1).next_power_of_two();
        let slot = || Slot {
            word: AtomicU64::new(VACANT),
            key: AtomicU64::new(0),
        };
        Slots {
            buckets: (0..nr_buckets)
                .map(|_| Bucket([slot(), slot(), slot(), slot()]))
                .collect(),
            mask: nr_buckets - 1,
            bindable: nr_slots > 0,
        }
    }

    pub(crate) fn nr_slots(&self) -> usize {
        if self.bindable {
            self.buckets.len() * WAYS
        } else {
            0
        }
    }

    #[inline(always)]
    pub(crate) fn slot(&self, id: SlotId) -> &Slot {
        &self.buckets[id as usize / WAYS].0[id as usize % WAYS]
    }

    #[inline(always)]
    fn bucket_of(&self, key: Hashed) -> usize {
        key.hash as usize & self.mask
    }

    /// The slot `key` is bound to (open or sealed), and its word; the fast path and the
    /// mutex holder both look keys up this way.
    #[inline(always)]
    fn lookup(&self, key: Hashed) -> Option<(SlotId, u64)> {
        let b = self.bucket_of(key);
        let packed = key.key.packed()?;
        for (way, slot) in self.buckets[b].0.iter().enumerate() {
            // The word first (acquire): the key read after it is the one bound with it or a
            // later one, and a later binding changes the generation, failing any CAS based on
            // this word.
            let word = slot.word.load(Ordering::Acquire);
            if word & VACANT == 0 && slot.key.load(Ordering::Relaxed) == packed {
                return Some(((b * WAYS + way) as SlotId, word));
            }
        }
        None
    }

    /// The lock-free acquire: `key` in `mode`, if its slot is open and its holders allow it.
    #[inline(always)]
    pub(crate) fn try_acquire(&self, key: Hashed, mode: Mode) -> Option<(SlotId, &Slot)> {
        let (id, word) = self.lookup(key)?;
        let slot = self.slot(id);
        slot.try_hold(word, mode).then_some((id, slot))
    }

    // Under the shard's mutex from here on.

    /// The open slot `key` is bound to, and its word (a sealed one has a cell, found first).
    pub(crate) fn find(&self, key: Hashed) -> Option<(SlotId, u64)> {
        self.lookup(key)
    }

    /// Adds a holder in `mode` to open slot `id` if its holders allow.
    pub(crate) fn hold_open(&self, id: SlotId, mode: Mode) -> bool {
        let slot = self.slot(id);
        slot.try_hold(slot.word.load(Ordering::Acquire), mode)
    }

    /// Binds unbound `key` to a vacant slot of its bucket, or to an idle one (open, no
    /// holders) taken from its key, granting `mode`; `None` if every slot is in use.
    pub(crate) fn bind(&self, key: Hashed, mode: Mode) -> Option<SlotId> {
        if !self.bindable {
            return None;
        }
        let packed = key.key.packed()?;
        let b = self.bucket_of(key);
        let ways = &self.buckets[b].0;
        let pick = |vacant: bool| {
            ways.iter().enumerate().find_map(|(way, slot)| {
                let word = slot.word.load(Ordering::Acquire);
                if vacant {
                    // Only the mutex holder leaves a vacant state.
                    return (word & VACANT != 0).then_some((way, word));
                }
                if word & (HOLDERS | SLOW | VACANT) != 0 {
                    return None;
                }
                // Idle: evict its key, unless a fast-path acquire takes it first.
                let vacant = VACANT | next_gen(word);
                slot.word
                    .compare_exchange(word, vacant, Ordering::AcqRel, Ordering::Acquire)
                    .ok()
                    .map(|_| (way, vacant))
            })
        };
        let (way, vacant) = pick(true).or_else(|| pick(false))?;
        let slot = &ways[way];
        slot.key.store(packed, Ordering::Relaxed);
        // Publishes the key with the word (release), same generation as the vacancy.
        slot.word
            .store((vacant & GEN_MASK) | one(mode), Ordering::Release);
        Some((b * WAYS + way) as SlotId)
    }

    /// Seals open slot `id`: from now on its key's cell decides. Returns the holders at that
    /// instant, which the cell takes over.
    pub(crate) fn seal(&self, id: SlotId) -> Holders {
        let word = self.slot(id).word.fetch_or(SLOW, Ordering::AcqRel);
        debug_assert!(word & (SLOW | VACANT) == 0, "sealing slot {id} twice");
        Holders::of(word)
    }

    /// Reopens sealed slot `id`, whose holders have all reported their release to the cell.
    pub(crate) fn unseal(&self, id: SlotId) {
        let word = self.slot(id).word.fetch_and(!SLOW, Ordering::AcqRel);
        debug_assert!(
            word & SLOW != 0 && word & HOLDERS == 0,
            "unsealing slot {id}: {word:#x}"
        );
    }

    /// Unbinds sealed slot `id`, which has no holders.
    pub(crate) fn vacate(&self, id: SlotId) {
        let slot = self.slot(id);
        let word = slot.word.load(Ordering::Acquire);
        debug_assert!(
            word & SLOW != 0 && word & HOLDERS == 0,
            "vacating slot {id}: {word:#x}"
        );
        slot.word.store(VACANT | next_gen(word), Ordering::Release);
    }

    /// A holder of sealed slot `id` in `mode` becomes a holder of the key's cell, which
    /// already counts it: only the slot forgets it.
    pub(crate) fn forget(&self, id: SlotId, mode: Mode) {
        let word = self.slot(id).word.fetch_sub(one(mode), Ordering::AcqRel);
        debug_assert!(word & SLOW != 0, "slot {id} handed over while open");
    }

    /// Every bound slot: its id, key and word. A snapshot: fast-path holders come and go.
    pub(crate) fn bound(&self) -> impl Iterator<Item = (SlotId, Key, u64)> + '_ {
        (0..self.nr_slots() as SlotId).filter_map(|id| {
            let slot = self.slot(id);
            let word = slot.word.load(Ordering::Acquire);
            (word & VACANT == 0).then(|| (id, Key::unpack(slot.key.load(Ordering::Relaxed)), word))
        })
    }
}

/// Whether `word` is sealed.
pub(crate) fn is_sealed(word: u64) -> bool {
    word & SLOW != 0
}

/// The holders a word records, as modes, for the consistency check.
pub(crate) fn holds(word: u64, mode: Mode) -> bool {
    let h = Holders::of(word);
    match mode {
        Mode::Shared(access) => h.nr_shared[access as usize] > 0,
        Mode::Upgradable => h.upgradable,
        Mode::Exclusive(level) => h.exclusive == Some(level),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::key::ALL_MODES;

    #[test]
    fn refused_by_matches_the_compatibility_table() {
        for held in ALL_MODES {
            for asked in ALL_MODES {
                let word = one(held);
                assert_eq!(
                    word & refused_by(asked) != 0,
                    held.conflicts(asked),
                    "{held:?} held, {asked:?} asked"
                );
            }
        }
    }

    #[test]
    fn words_round_trip_through_holders() {
        let word = 3 * R_ONE + 2 * W_ONE + UPG;
        assert_eq!(
            Holders::of(word),
            Holders {
                nr_shared: [3, 2],
                upgradable: true,
                exclusive: None
            }
        );
        assert_eq!(
            Holders::of(EX_RW | GEN_ONE).exclusive,
            Some(Level::ReadWrite)
        );
        assert_eq!(Holders::of(word).count(), 6);
    }

    #[test]
    fn a_rebound_slot_fails_stale_acquires() {
        let slots = Slots::new(WAYS);
        let a = Hashed::new(Key::virt(1, 0));
        let mode = Mode::Exclusive(Level::ReadWrite);
        let id = slots.bind(a, mode).expect("vacant slot");
        let stale = slots.slot(id).word.load(Ordering::Acquire) - one(mode);
        assert!(!slots.slot(id).release(mode));
        // Evict a by binding other keys to every slot of the bucket.
        let ids: Vec<_> = (1..=WAYS as u64)
            .map(|v| slots.bind(Hashed::new(Key::virt(1, v)), mode))
            .collect();
        assert!(ids.contains(&Some(id)), "{ids:?}");
        // An acquire that read a's idle word before the eviction must not lock b's slot.
        assert!(!slots.slot(id).try_hold(stale, Mode::Shared(Access::Read)));
    }

    #[test]
    fn shared_counts_saturate_into_the_slow_path() {
        let slots = Slots::new(WAYS);
        let key = Hashed::new(Key::data(9));
        let id = slots.bind(key, Mode::Shared(Access::Read)).expect("slot");
        slots.slot(id).word.fetch_add(R_MASK - 1, Ordering::AcqRel);
        assert!(slots.try_acquire(key, Mode::Shared(Access::Read)).is_none());
        assert_eq!(
            slots
                .try_acquire(key, Mode::Shared(Access::Write))
                .map(|(id, _)| id),
            Some(id)
        );
    }
}
