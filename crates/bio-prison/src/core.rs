//! One shard's lock table: a plain, single-threaded state machine.
//!
//! The `Prison` wraps each `Core` in a mutex and turns its answers into futures; everything that
//! decides who holds what lives here, so the unit tests, the model test, the stress test and
//! loom all exercise this same code.
//!
//! The common case never gets here: a key bound to an open slot of the shard's lock-free
//! table (`slots`) is locked and released there. The core takes a key over when it must queue
//! a request, wait for a conversion, or hold it under a range lock (it *seals* the slot and
//! gives the key a cell that counts the slot's holders too), and keys that find no free slot
//! live here from the start.
//!
//! Invariants (checked by `Core::check`):
//! - A cell exists while it has a holder, a queued waiter or a pending conversion, and is freed
//!   the moment it has none; `index` maps the key of each to it. A cell taken over from a slot
//!   names it (`slot`); freeing the cell reopens the slot (or vacates it, under a covering
//!   range lock). So a shard holds its cells in use and its fixed slot table.
//! - Holders of one cell are pairwise compatible (`Mode::conflicts`), and no granted fence
//!   covering the cell conflicts with them.
//! - At most one conversion per cell, and only by its upgradable or exclusive holder; while it is
//!   pending it keeps out new shared requests it conflicts with.
//! - The queue is in arrival (`seq`) order. A waiter stays queued only while it conflicts with a
//!   holder, a pending conversion, an earlier waiter of its cell, or an earlier fence covering
//!   it: anything else has been granted and its waker woken. This is "first come, first served
//!   between conflicting requests", so a waiting exclusive request holds back later shared ones
//!   and writers never starve, while compatible requests (readers behind a writer that only
//!   waits for an exclusive `Level::Write` holder) are not held back for nothing.
//! - A granted waiter keeps its record until its future collects it or is dropped; either way
//!   the lock it was granted is accounted as held.
//! - Wakers are only collected in `wakes` and woken by the caller after unlocking.

use std::collections::HashMap;
use std::task::Waker;

use slab::Slab;

use crate::fence::{FencePart, FenceShared};
use crate::key::{Access, BuildPassHasher, Hashed, Key, Level, Mode, ALL_MODES, NR_MODES};
use crate::slots::{is_sealed, Holders, SlotId, Slots};
use crate::sync::Arc;

/// "No waiter" in the intrusive queue links.
pub(crate) const NIL: u32 = u32::MAX;

/// Index of a cell in `Core::cells`; stable while the cell is in use.
pub(crate) type CellId = u32;
/// Index of a waiter in `Core::waiters`; stable until the waiter is collected or cancelled.
pub(crate) type WaiterId = u32;

/// Above this many cells' capacity, a shard whose cells are all freed gives the memory back.
const SHRINK_ABOVE: usize = 1024;

/// Slots of a shard's lock-free table by default (`Prison::new`, `Prison::with_shards`).
#[cfg(not(miri))]
pub(crate) const DEFAULT_SLOTS: usize = 256;
/// Under miri, whose every atomic access is costly, a smaller default table keeps the crate's
/// tests (which scan the tables in every invariant check) within the CI budget; the code paths
/// are the same, and the tables fill and evict sooner.
#[cfg(miri)]
pub(crate) const DEFAULT_SLOTS: usize = 16;

/// Where a granted lock is accounted: an open slot, or a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    Slot(SlotId),
    Cell(CellId),
}

/// The lock state of one key.
#[derive(Debug)]
pub(crate) struct Cell {
    pub(crate) key: Key,
    /// Shared holders, indexed by `Access as usize`.
    pub(crate) nr_shared: [u32; 2],
    /// All holders: both shared counts, plus one for an upgradable or exclusive holder. One
    /// word for the fast paths to test.
    pub(crate) nr_holders: u32,
    pub(crate) upgradable: bool,
    pub(crate) exclusive: Option<Level>,
    /// Boxed: conversions are rare and the cell stays within a cache line without it.
    pub(crate) conversion: Option<Box<Conversion>>,
    pub(crate) head: WaiterId,
    pub(crate) tail: WaiterId,
    /// Queued waiters, indexed by `Mode::index`.
    pub(crate) nr_waiting: [u32; NR_MODES],
    /// The sealed slot this cell took the key over from, or `NIL`.
    pub(crate) slot: SlotId,
}

/// The cell's upgradable holder becoming exclusive, or its exclusive holder raising its level.
#[derive(Debug)]
pub(crate) struct Conversion {
    pub(crate) target: Level,
    /// Set when the holder's mode has been changed to `Exclusive(target)`.
    pub(crate) granted: bool,
    pub(crate) waker: Option<Waker>,
}

/// A queued request, or a granted one that its future has not collected yet.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) cell: CellId,
    pub(crate) mode: Mode,
    pub(crate) seq: u64,
    pub(crate) prev: WaiterId,
    pub(crate) next: WaiterId,
    pub(crate) waker: Option<Waker>,
    pub(crate) granted: bool,
}

/// Something to wake once the shard's mutex has been released.
#[derive(Debug)]
pub(crate) enum Wake {
    Task(Waker),
    /// One shard's part of a range or thin lock was granted.
    Fence(Arc<FenceShared>),
}

impl Wake {
    pub(crate) fn fire(self) {
        match self {
            Wake::Task(waker) => waker.wake(),
            Wake::Fence(shared) => shared.part_granted(),
        }
    }
}

/// What `Core::acquire` did with a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Acquired {
    Granted(Loc),
    Queued(WaiterId),
    /// Not grantable now and the caller did not want to wait.
    Refused,
}

impl Cell {
    /// A cell for `key` with `holders` (those of the slot it takes over, or none).
    fn new(key: Key, holders: Holders, slot: SlotId) -> Cell {
        Cell {
            key,
            nr_shared: holders.nr_shared,
            nr_holders: holders.count(),
            upgradable: holders.upgradable,
            exclusive: holders.exclusive,
            conversion: None,
            head: NIL,
            tail: NIL,
            nr_waiting: [0; NR_MODES],
            slot,
        }
    }

    /// Whether some holder of this cell holds it in `mode`.
    #[inline]
    pub(crate) fn holds(&self, mode: Mode) -> bool {
        match mode {
            Mode::Shared(access) => self.nr_shared[access as usize] > 0,
            Mode::Upgradable => self.upgradable,
            Mode::Exclusive(level) => self.exclusive == Some(level),
        }
    }

    fn has_holders(&self) -> bool {
        self.nr_holders != 0
    }

    fn pending_conversion(&self) -> Option<Level> {
        self.conversion
            .as_ref()
            .filter(|c| !c.granted)
            .map(|c| c.target)
    }

    /// Whether granting `mode` now would conflict with a holder or a pending conversion.
    pub(crate) fn holders_conflict(&self, mode: Mode) -> bool {
        if !self.has_holders() {
            return false;
        }
        ALL_MODES
            .iter()
            .any(|&held| self.holds(held) && held.conflicts(mode))
            || self
                .pending_conversion()
                .is_some_and(|t| Mode::Exclusive(t).conflicts(mode))
    }

    /// Whether `mode` conflicts with some queued waiter.
    fn queue_conflicts(&self, mode: Mode) -> bool {
        self.head != NIL
            && ALL_MODES
                .iter()
                .any(|&w| self.nr_waiting[w.index()] > 0 && w.conflicts(mode))
    }

    /// Whether the shared holders that an exclusive lock at `target` must outlast are gone.
    pub(crate) fn shared_drained(&self, target: Level) -> bool {
        [Access::Read, Access::Write]
            .iter()
            .all(|&a| self.nr_shared[a as usize] == 0 || !target.blocks(a))
    }

    pub(crate) fn is_unused(&self) -> bool {
        !self.has_holders() && self.conversion.is_none() && self.head == NIL
    }

    #[inline]
    fn hold(&mut self, mode: Mode) {
        self.nr_holders += 1;
        match mode {
            Mode::Shared(access) => self.nr_shared[access as usize] += 1,
            Mode::Upgradable => {
                assert!(
                    !self.upgradable && self.exclusive.is_none(),
                    "upgradable granted twice"
                );
                self.upgradable = true;
            }
            Mode::Exclusive(level) => {
                assert!(
                    !self.upgradable && self.exclusive.is_none(),
                    "exclusive granted twice"
                );
                self.exclusive = Some(level);
            }
        }
    }

    #[inline]
    fn unhold(&mut self, mode: Mode) {
        assert!(
            self.holds(mode),
            "{}: releasing {mode:?}, which is not held",
            self.key
        );
        self.nr_holders -= 1;
        match mode {
            Mode::Shared(access) => self.nr_shared[access as usize] -= 1,
            Mode::Upgradable => self.upgradable = false,
            Mode::Exclusive(_) => self.exclusive = None,
        }
    }
}

/// One shard: its cells, its waiters and its parts of range and thin locks.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) index: HashMap<Hashed, CellId, BuildPassHasher>,
    pub(crate) cells: Slab<Cell>,
    /// The shard's lock-free table, which the fast path uses without this core's mutex.
    pub(crate) slots: Slots,
    pub(crate) waiters: Slab<Waiter>,
    /// Parts of range and thin locks, in `seq` order; usually empty.
    pub(crate) fences: Vec<FencePart>,
    pub(crate) next_seq: u64,
    /// Filled by every operation, drained by the caller after it unlocks the shard.
    pub(crate) wakes: Vec<Wake>,
}

fn slot(index: usize) -> u32 {
    u32::try_from(index)
        .ok()
        .filter(|&i| i != NIL)
        .expect("more than 4G locks in one shard")
}

impl Core {
    /// An empty shard over slot table `slots`.
    pub(crate) fn new(slots: Slots) -> Core {
        Core {
            index: HashMap::default(),
            cells: Slab::new(),
            slots,
            waiters: Slab::new(),
            fences: Vec::new(),
            next_seq: 0,
            wakes: Vec::new(),
        }
    }

    /// A new request for `key` in `mode` that the fast path did not grant: granted, queued
    /// (when a waker is given) or refused.
    pub(crate) fn acquire(&mut self, key: Hashed, mode: Mode, waker: Option<&Waker>) -> Acquired {
        let cell = match self.index.get(&key) {
            Some(&cell) => cell,
            None => match self.slots.find(key) {
                // Open (a sealed slot's key has a cell): the fast path lost a race, or the
                // holders conflict. To queue, the core takes the key over.
                Some((slot, word)) => {
                    debug_assert!(!is_sealed(word), "{}: sealed without a cell", key.key);
                    if self.slots.hold_open(slot, mode) {
                        return Acquired::Granted(Loc::Slot(slot));
                    }
                    if waker.is_none() {
                        return Acquired::Refused;
                    }
                    self.take_over(slot, key)
                }
                None => {
                    if !self.fence_covers(key.key) {
                        if let Some(slot) = self.slots.bind(key, mode) {
                            return Acquired::Granted(Loc::Slot(slot));
                        }
                    }
                    self.new_cell(key, Holders::default(), NIL)
                }
            },
        };
        let key = key.key;
        let c = &self.cells[cell as usize];
        if !c.holders_conflict(mode)
            && !c.queue_conflicts(mode)
            && !self.fence_blocks(key, mode, u64::MAX)
        {
            self.cells[cell as usize].hold(mode);
            return Acquired::Granted(Loc::Cell(cell));
        }
        let Some(waker) = waker else {
            self.free_if_unused(cell);
            return Acquired::Refused;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let tail = c.tail;
        let w = slot(self.waiters.insert(Waiter {
            cell,
            mode,
            seq,
            prev: tail,
            next: NIL,
            waker: Some(waker.clone()),
            granted: false,
        }));
        match tail {
            NIL => self.cells[cell as usize].head = w,
            _ => self.waiters[tail as usize].next = w,
        }
        let c = &mut self.cells[cell as usize];
        c.tail = w;
        c.nr_waiting[mode.index()] += 1;
        Acquired::Queued(w)
    }

    /// The cell a granted waiter now holds, collecting its record; or `None`, remembering
    /// `waker` for the grant.
    pub(crate) fn poll_waiter(&mut self, w: WaiterId, waker: &Waker) -> Option<CellId> {
        let waiter = &mut self.waiters[w as usize];
        if waiter.granted {
            let cell = waiter.cell;
            self.waiters.remove(w as usize);
            return Some(cell);
        }
        if !waiter
            .waker
            .as_ref()
            .is_some_and(|old| old.will_wake(waker))
        {
            waiter.waker = Some(waker.clone());
        }
        None
    }

    /// The waiter's future was dropped: give back what it was granted, or leave the queue.
    pub(crate) fn cancel_waiter(&mut self, w: WaiterId) {
        if self.waiters[w as usize].granted {
            let waiter = self.waiters.remove(w as usize);
            self.release(waiter.cell, waiter.mode);
        } else {
            let cell = self.unlink(w);
            self.waiters.remove(w as usize);
            // Later waiters it held back, and fences that waited for it, may go now.
            self.settle(cell);
        }
    }

    /// A holder of `cell` in `mode` lets go.
    pub(crate) fn release(&mut self, cell: CellId, mode: Mode) {
        self.cells[cell as usize].unhold(mode);
        self.settle(cell);
    }

    /// A holder of `key`'s sealed slot has let go there (in `mode`); the cell that took the
    /// key over still counts it.
    pub(crate) fn release_sealed(&mut self, key: Key, mode: Mode) {
        let cell = *self
            .index
            .get(&Hashed::new(key))
            .unwrap_or_else(|| panic!("{key}: sealed slot without a cell"));
        self.release(cell, mode);
    }

    /// A holder of `key`'s slot in `mode` becomes a holder of its cell, taking the key over
    /// if its slot is still open; returns the cell.
    pub(crate) fn adopt(&mut self, slot: SlotId, key: Key, mode: Mode) -> CellId {
        let key = Hashed::new(key);
        let cell = match self.index.get(&key) {
            Some(&cell) => cell,
            None => self.take_over(slot, key),
        };
        debug_assert_eq!(self.cells[cell as usize].slot, slot, "{}", key.key);
        self.slots.forget(slot, mode);
        cell
    }

    /// Seals `key`'s open slot and gives the key a cell holding what the slot held.
    pub(crate) fn take_over(&mut self, slot: SlotId, key: Hashed) -> CellId {
        let holders = self.slots.seal(slot);
        self.new_cell(key, holders, slot)
    }

    fn new_cell(&mut self, key: Hashed, holders: Holders, slot: SlotId) -> CellId {
        let cell = self::slot(self.cells.insert(Cell::new(key.key, holders, slot)));
        self.index.insert(key, cell);
        cell
    }

    /// A shared holder asks to become the upgradable holder; refused, and left shared, when
    /// another holder is upgradable or exclusive or a range or thin lock covering the key is
    /// registered (granted or not).
    ///
    /// Conversions never wait: two shared holders waiting to upgrade would wait for each other.
    /// Refusing under a registered fence, rather than only a granted one, keeps fences simple
    /// (a part once granted stays granted) and fair: holders that arrived after the fence
    /// cannot keep re-entering its way by upgrading; the refused holder's retry queues behind it.
    pub(crate) fn try_upgradable(&mut self, cell: CellId, access: Access) -> bool {
        let c = &self.cells[cell as usize];
        if c.upgradable || c.exclusive.is_some() || self.fence_covers(c.key) {
            return false;
        }
        let c = &mut self.cells[cell as usize];
        c.unhold(Mode::Shared(access));
        c.hold(Mode::Upgradable);
        true
    }

    /// The upgradable holder becomes exclusive at `target`, or the exclusive holder raises its
    /// level to `target`: at once if no shared holder it conflicts with remains (true), or else
    /// once they drain (false; `poll_conversion` tells when). Queued requests and waiting
    /// fences do not delay a conversion: they already wait for this holder.
    pub(crate) fn begin_conversion(&mut self, cell: CellId, target: Level, waker: &Waker) -> bool {
        let c = &mut self.cells[cell as usize];
        assert!(c.conversion.is_none(), "{}: two conversions", c.key);
        assert!(
            c.upgradable || c.exclusive.is_some_and(|l| l <= target),
            "{}: converting to {target:?} from {:?}",
            c.key,
            c.exclusive
        );
        if c.shared_drained(target) {
            c.upgradable = false;
            c.exclusive = Some(target);
            return true;
        }
        c.conversion = Some(Box::new(Conversion {
            target,
            granted: false,
            waker: Some(waker.clone()),
        }));
        false
    }

    /// Whether the cell's conversion has been granted (collecting it), else remember `waker`.
    pub(crate) fn poll_conversion(&mut self, cell: CellId, waker: &Waker) -> bool {
        let c = &mut self.cells[cell as usize];
        let conversion = c
            .conversion
            .as_mut()
            .expect("polling a conversion that is not there");
        if conversion.granted {
            c.conversion = None;
            return true;
        }
        if !conversion
            .waker
            .as_ref()
            .is_some_and(|old| old.will_wake(waker))
        {
            conversion.waker = Some(waker.clone());
        }
        false
    }

    /// The conversion's future was dropped: the holder lets go of the cell entirely.
    pub(crate) fn cancel_conversion(&mut self, cell: CellId) {
        let c = &mut self.cells[cell as usize];
        c.conversion
            .take()
            .expect("cancelling a conversion that is not there");
        let mode = match c.exclusive {
            Some(level) => Mode::Exclusive(level),
            None => Mode::Upgradable,
        };
        self.release(cell, mode);
    }

    /// An upgradable or exclusive holder becomes a shared holder doing `access`.
    pub(crate) fn downgrade(&mut self, cell: CellId, from: Mode, access: Access) {
        let c = &mut self.cells[cell as usize];
        c.unhold(from);
        c.hold(Mode::Shared(access));
        self.settle(cell);
    }

    /// Grants whatever a change to `cell` made grantable, then frees it if unused.
    pub(crate) fn settle(&mut self, cell: CellId) {
        let c = &self.cells[cell as usize];
        if c.head != NIL || c.conversion.is_some() {
            self.settle_cell(cell);
        }
        if !self.fences.is_empty() {
            self.settle_fences();
        }
        self.free_if_unused(cell);
    }

    /// Grants the pending conversion and the queued waiters that nothing holds back any more.
    pub(crate) fn settle_cell(&mut self, cell: CellId) {
        let c = &mut self.cells[cell as usize];
        if let Some(target) = c.pending_conversion() {
            if c.shared_drained(target) {
                c.upgradable = false;
                c.exclusive = Some(target);
                let conversion = c.conversion.as_mut().expect("pending conversion");
                conversion.granted = true;
                if let Some(waker) = conversion.waker.take() {
                    self.wakes.push(Wake::Task(waker));
                }
            }
        }
        let key = c.key;
        let mut w = c.head;
        // Modes of the waiters passed over so far: a later waiter must not overtake them.
        let mut stuck = [false; NR_MODES];
        while w != NIL {
            let waiter = &self.waiters[w as usize];
            let (mode, seq, next) = (waiter.mode, waiter.seq, waiter.next);
            let held_back = self.cells[cell as usize].holders_conflict(mode)
                || ALL_MODES
                    .iter()
                    .any(|&m| stuck[m.index()] && m.conflicts(mode))
                || self.fence_blocks(key, mode, seq);
            if held_back {
                stuck[mode.index()] = true;
                if mode == Mode::Exclusive(Level::ReadWrite) {
                    break; // conflicts with everything behind it
                }
            } else {
                self.unlink(w);
                self.cells[cell as usize].hold(mode);
                let waiter = &mut self.waiters[w as usize];
                waiter.granted = true;
                if let Some(waker) = waiter.waker.take() {
                    self.wakes.push(Wake::Task(waker));
                }
            }
            w = next;
        }
    }

    /// Takes queued waiter `w` out of its cell's queue; returns the cell.
    fn unlink(&mut self, w: WaiterId) -> CellId {
        let waiter = &mut self.waiters[w as usize];
        let (cell, prev, next, mode) = (waiter.cell, waiter.prev, waiter.next, waiter.mode);
        waiter.prev = NIL;
        waiter.next = NIL;
        match prev {
            NIL => self.cells[cell as usize].head = next,
            _ => self.waiters[prev as usize].next = next,
        }
        match next {
            NIL => self.cells[cell as usize].tail = prev,
            _ => self.waiters[next as usize].prev = prev,
        }
        self.cells[cell as usize].nr_waiting[mode.index()] -= 1;
        cell
    }

    /// Frees `cell` if it is no longer in use, giving its key back to its slot.
    pub(crate) fn free_if_unused(&mut self, cell: CellId) {
        if !self.cells[cell as usize].is_unused() {
            return;
        }
        let c = self.cells.remove(cell as usize);
        self.index.remove(&Hashed::new(c.key));
        if c.slot != NIL {
            // Its holders have all reported: the slot counts none.
            if self.fence_covers(c.key) {
                self.slots.vacate(c.slot);
            } else {
                self.slots.unseal(c.slot);
            }
        }
        if self.cells.is_empty() && self.cells.capacity() > SHRINK_ABOVE {
            self.shrink();
        }
    }

    /// Memory follows the locks in use, not the high-water mark of a burst: with no cell in
    /// use, start again from empty tables.
    #[cold]
    fn shrink(&mut self) {
        self.cells = Slab::new();
        self.index = HashMap::default();
        if self.waiters.is_empty() {
            self.waiters = Slab::new();
        }
    }

    /// Number of keys in use: cells, and open slots with holders.
    pub(crate) fn nr_cells(&self) -> usize {
        let busy_slots = self
            .slots
            .bound()
            .filter(|&(_, _, word)| !is_sealed(word) && Holders::of(word).count() > 0)
            .count();
        self.cells.len() + busy_slots
    }

    /// Number of open slots without holders: keys ready for the fast path.
    pub(crate) fn nr_idle_cells(&self) -> usize {
        self.slots
            .bound()
            .filter(|&(_, _, word)| !is_sealed(word) && Holders::of(word).count() == 0)
            .count()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::task::Waker;

    const RW: Mode = Mode::Exclusive(Level::ReadWrite);

    fn core(nr_slots: usize) -> Core {
        Core::new(Slots::new(nr_slots))
    }

    fn granted(core: &mut Core, key: Key, mode: Mode) -> Loc {
        match core.acquire(Hashed::new(key), mode, Some(Waker::noop())) {
            Acquired::Granted(loc) => loc,
            other => panic!("{key} {mode:?}: {other:?}"),
        }
    }

    #[test]
    fn free_slots_bind_and_full_buckets_fall_back_to_cells() {
        let mut core = core(crate::slots::WAYS); // one bucket
        let keys: Vec<Key> = (0..=crate::slots::WAYS as u64)
            .map(|v| Key::virt(1, v))
            .collect();
        let locs: Vec<Loc> = keys.iter().map(|&k| granted(&mut core, k, RW)).collect();
        let (last, bound) = locs.split_last().expect("keys");
        assert!(bound.iter().all(|l| matches!(l, Loc::Slot(_))), "{locs:?}");
        let &Loc::Cell(cell) = last else {
            panic!("{locs:?}")
        };
        assert_eq!(core.nr_cells(), keys.len());
        core.check(0);
        core.release(cell, RW);
        assert!(core.cells.is_empty(), "an unused cell is freed at once");
        core.check(0);
    }

    #[test]
    fn a_queued_request_takes_the_key_over_until_it_is_unused() {
        let mut core = core(2);
        let key = Key::virt(1, 1);
        let Loc::Slot(slot) = granted(&mut core, key, RW) else {
            panic!("no slot")
        };
        let Acquired::Queued(w) = core.acquire(Hashed::new(key), RW, Some(Waker::noop())) else {
            panic!("not queued")
        };
        assert_eq!(core.cells.len(), 1, "taken over");
        assert!(core
            .slots
            .find(Hashed::new(key))
            .is_some_and(|(_, w)| is_sealed(w)));
        core.check(0);
        // The slot holder lets go there, and reports to the cell, which grants the waiter.
        assert!(core.slots.slot(slot).release(RW), "sealed");
        core.release_sealed(key, RW);
        let cell = core.poll_waiter(w, Waker::noop()).expect("granted");
        core.check(0);
        core.release(cell, RW);
        assert!(core.cells.is_empty());
        let (_, word) = core.slots.find(Hashed::new(key)).expect("still bound");
        assert!(!is_sealed(word), "reopened for the fast path");
        assert_eq!(core.nr_idle_cells(), 1);
        core.check(0);
    }

    #[test]
    fn no_slots_when_the_bound_is_zero() {
        let mut core = core(0);
        let Loc::Cell(cell) = granted(&mut core, Key::virt(0, 0), RW) else {
            panic!("bound to a slot")
        };
        core.release(cell, RW);
        assert_eq!((core.cells.len(), core.index.len()), (0, 0));
        assert_eq!(core.slots.nr_slots(), 0);
    }
}
