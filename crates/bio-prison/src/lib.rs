//! Async block locks for the remap engine: bio-prison v2 turned into futures.
//!
//! A request takes a lock for its whole life instead of a cell for a moment: shared on
//! (thin, virtual block) for ordinary I/O, upgraded to exclusive to provision or to break
//! sharing, exclusive on data blocks to fence a discard against a copy, and exclusive on a
//! range of blocks or a whole thin to quiesce it. `docs/locking.md` maps the engine's steps to
//! these calls and gives the lock order.
//!
//! ```
//! use bio_prison::{Access, Key, Level, Prison};
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     let mut f = std::pin::pin!(f);
//! #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
//! # }
//! let prison = Prison::new();
//! block_on(async {
//!     // A write to an unprovisioned block: shared for the request, exclusive to provision.
//!     let shared = prison.shared(Key::virt(1, 42), Access::Write).await;
//!     let exclusive = shared.upgrade(Level::ReadWrite).expect("no one else upgrading").await;
//!     let data = prison.exclusive(Key::data(7), Level::ReadWrite).await;
//!     // ... insert the mapping ...
//!     drop(data);
//!     let _shared = exclusive.downgrade(Access::Write); // issue the write beside others
//! });
//! assert_eq!(prison.nr_cells(), 0);
//! ```
//!
//! Invariants, beyond those of each module:
//! - No I/O and no unsafe code; nothing here blocks a thread except the short, bounded critical
//!   sections of one shard's mutex (or the fence registration mutex), and no waker is woken
//!   while one is held.
//! - Every future is cancellation-safe: dropping it before it completes leaves no lock held and
//!   no waiter queued, and lets through whoever it was holding back. Every guard releases on
//!   drop.
//! - Memory is proportional to the locks in use and the requests waiting, plus a constant:
//!   each shard's fixed table of slots (`DEFAULT_IDLE_CELLS_PER_SHARD` by default), which
//!   keeps the keys locked recently, and cells for the keys in use that need more than a slot
//!   (a queue, a waiting conversion, a range lock over them, a full bucket), recycled in a
//!   slab and freed as soon as their last holder and waiter leave.
//! - The uncontended path takes no mutex: one compare-and-swap on the key's slot to lock, one
//!   fetch-and-sub to release (`slots`).
#![forbid(unsafe_code)]

mod check;
mod core;
mod error;
mod fence;
mod future;
mod guard;
mod key;
mod slots;
mod sync;

use std::fmt;
use std::ops::Range;

pub use error::{Error, Result};
pub use future::{Convert, ExclusiveFuture, FenceFuture, SharedFuture, UpgradableFuture};
pub use guard::{ExclusiveGuard, FenceGuard, SharedGuard, UpgradableGuard};
pub use key::{Access, DBlock, Key, Level, ThinId, VBlock};

use crate::core::{Acquired, Core};
use crate::future::Acquire;
use crate::guard::Held;
use crate::key::{Hashed, Mode};
use crate::slots::Slots;
use crate::sync::Mutex;

/// Shards of a `Prison::new()`: enough that queue threads rarely meet on one mutex.
pub const DEFAULT_NR_SHARDS: usize = 16;
/// The most shards a prison will have; a range or thin lock visits every one.
pub const MAX_NR_SHARDS: usize = 1024;
/// Slots in each shard's lock-free table for a `Prison::new()`: a key bound to a slot is
/// locked and released without the shard's mutex, and an unlocked key keeps its slot (idle)
/// until another key of its bucket needs it.
pub const DEFAULT_IDLE_CELLS_PER_SHARD: usize = crate::core::DEFAULT_SLOTS;

/// The lock table: single-block cells spread over mutex-protected shards by key hash, plus the
/// range and thin locks that span them.
pub struct Prison {
    shards: Box<[Shard]>,
    /// Serialises the registration of range and thin locks so that every shard orders them
    /// alike; holds the next fence id.
    fence_registry: Mutex<u64>,
}

/// One shard, on its own cache lines so that queue threads working on different shards do not
/// bounce each other's mutex.
#[repr(align(128))]
struct Shard {
    /// The lock-free table, also the core's (`Core::slots`).
    slots: Slots,
    core: Mutex<Core>,
}

impl Default for Prison {
    fn default() -> Prison {
        Prison::new()
    }
}

impl fmt::Debug for Prison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prison")
            .field("nr_shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Prison {
    /// A prison with `DEFAULT_NR_SHARDS` shards.
    pub fn new() -> Prison {
        Prison::with_shards(DEFAULT_NR_SHARDS)
    }

    /// A prison with `nr_shards` shards, rounded up to a power of two in `1..=MAX_NR_SHARDS`.
    pub fn with_shards(nr_shards: usize) -> Prison {
        Prison::with_shards_and_idle_cells(nr_shards, DEFAULT_IDLE_CELLS_PER_SHARD)
    }

    /// A prison with `nr_shards` shards (as in `with_shards`), each with a lock-free table of
    /// `idle_cells` slots (rounded up to whole buckets of two, a power of two of them); 0 sends
    /// every lock through the shard's mutex. Locking behaves the same whatever the size; only
    /// speed and memory differ.
    pub fn with_shards_and_idle_cells(nr_shards: usize, idle_cells: usize) -> Prison {
        let nr_shards = nr_shards.clamp(1, MAX_NR_SHARDS).next_power_of_two();
        Prison {
            shards: (0..nr_shards)
                .map(|_| {
                    let slots = Slots::new(idle_cells);
                    Shard {
                        core: Mutex::new(Core::new(slots.clone())),
                        slots,
                    }
                })
                .collect(),
            fence_registry: Mutex::new(0),
        }
    }

    /// Number of shards.
    pub fn nr_shards(&self) -> usize {
        self.shards.len()
    }

    /// A shared lock on `key` for a request doing `access`.
    ///
    /// Granted beside other shared holders and an upgradable holder, and beside an exclusive
    /// holder whose level does not block `access`; queued behind earlier requests it
    /// conflicts with.
    #[inline]
    pub fn shared(&self, key: Key, access: Access) -> SharedFuture<'_> {
        SharedFuture(self.acquire(key, Mode::Shared(access)))
    }

    /// The upgradable lock on `key`: beside shared holders, but only one at a time and never
    /// beside an exclusive holder. It can become exclusive once the shared holders drain.
    #[inline]
    pub fn upgradable(&self, key: Key) -> UpgradableFuture<'_> {
        UpgradableFuture(self.acquire(key, Mode::Upgradable))
    }

    /// An exclusive lock on `key` at `level`, granted once every conflicting holder has gone.
    #[inline]
    pub fn exclusive(&self, key: Key, level: Level) -> ExclusiveFuture<'_> {
        ExclusiveFuture(self.acquire(key, Mode::Exclusive(level)))
    }

    /// `shared`, only if it can be granted without waiting.
    #[inline]
    pub fn try_shared(&self, key: Key, access: Access) -> Option<SharedGuard<'_>> {
        self.try_acquire(key, Mode::Shared(access))
            .map(SharedGuard::from_held)
    }

    /// `upgradable`, only if it can be granted without waiting.
    #[inline]
    pub fn try_upgradable(&self, key: Key) -> Option<UpgradableGuard<'_>> {
        self.try_acquire(key, Mode::Upgradable)
            .map(UpgradableGuard::from_held)
    }

    /// `exclusive`, only if it can be granted without waiting.
    #[inline]
    pub fn try_exclusive(&self, key: Key, level: Level) -> Option<ExclusiveGuard<'_>> {
        self.try_acquire(key, Mode::Exclusive(level))
            .map(ExclusiveGuard::from_held)
    }

    /// An exclusive lock at `level` on every block of `thin` in `vblocks` (a discard).
    ///
    /// Granted once every conflicting lock on a covered block, and every earlier overlapping
    /// range or thin lock, has gone; meanwhile it holds back later requests it conflicts with.
    /// An empty range locks nothing and is granted at once.
    pub fn exclusive_range(
        &self,
        thin: ThinId,
        vblocks: Range<VBlock>,
        level: Level,
    ) -> FenceFuture<'_> {
        let last = vblocks
            .end
            .0
            .checked_sub(1)
            .filter(|&last| last >= vblocks.start.0);
        FenceFuture::new(self, thin, last.map(|last| (vblocks.start.0, last)), level)
    }

    /// An exclusive lock at `level` on every block of `thin`: quiesces it (snapshot at
    /// `Level::Write` lets reads through; delete wants `Level::ReadWrite`).
    pub fn exclusive_thin(&self, thin: ThinId, level: Level) -> FenceFuture<'_> {
        FenceFuture::new(self, thin, Some((0, u64::MAX)), level)
    }

    /// Number of cells in use: keys with a holder or a waiter. Zero when nothing is locked.
    pub fn nr_cells(&self) -> usize {
        self.shards.iter().map(|s| s.core.lock().nr_cells()).sum()
    }

    /// Number of idle slots: bound to keys that were locked recently and are not locked now.
    /// At most `nr_shards()` times the per-shard table size.
    pub fn nr_idle_cells(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.core.lock().nr_idle_cells())
            .sum()
    }

    /// Walks every shard and panics, saying what is wrong, if the bookkeeping is inconsistent:
    /// incompatible holders, a waiter that should have been granted, a dangling link. It
    /// takes each shard's mutex in turn and costs O(locks in use); for tests.
    pub fn check_invariants(&self) {
        for (i, shard) in self.shards.iter().enumerate() {
            shard.core.lock().check(i);
        }
    }

    #[inline]
    fn acquire(&self, key: Key, mode: Mode) -> Acquire<'_> {
        Acquire::new(self, key, mode)
    }

    #[inline]
    fn try_acquire(&self, key: Key, mode: Mode) -> Option<Held<'_>> {
        let key = Hashed::new(key);
        let shard = self.shard_of(key);
        if let Some((id, slot)) = self.slots(shard).try_acquire(key, mode) {
            return Some(Held {
                prison: self,
                shard,
                at: guard::At::Slot(id, slot),
                key: key.key,
                mode,
            });
        }
        match self.with_core(shard, |core| core.acquire(key, mode, None)) {
            Acquired::Granted(loc) => Some(Held::new(self, shard, loc, key.key, mode)),
            Acquired::Queued(_) | Acquired::Refused => None,
        }
    }

    #[inline(always)]
    fn slots(&self, shard: u32) -> &Slots {
        &self.shards[shard as usize].slots
    }

    #[inline]
    fn shard_of(&self, key: Hashed) -> u32 {
        key::shard_of(key.hash, self.shards.len()) as u32
    }

    /// Runs `f` on one shard under its mutex, then wakes whoever `f` granted, unlocked.
    #[inline(always)]
    fn with_core<R>(&self, shard: u32, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = self.shards[shard as usize].core.lock();
        let result = f(&mut core);
        if core.wakes.is_empty() {
            return result;
        }
        let wakes = std::mem::take(&mut core.wakes);
        drop(core);
        fire(wakes);
        result
    }
}

/// Wakes what a shard operation granted; called with no mutex held.
#[inline(never)]
fn fire(wakes: Vec<core::Wake>) {
    for wake in wakes {
        wake.fire();
    }
}
