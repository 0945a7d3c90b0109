//! One shard's lock table: a plain, single-threaded state machine.
//!
//! The `Prison` wraps each `Core` in a mutex and turns its answers into futures; everything that
//! decides who holds what lives here, so the unit tests, the model test, the stress test and
//! loom all exercise this same code.
//!
//! Invariants (checked by `Core::check`):
//! - A cell is *in use* while it has a holder, a queued waiter or a pending conversion. A cell
//!   not in use is *idle*: it stays in the table, on the idle list in least recently used
//!   order, so that the next lock of its key is a lookup and a state change, not an insert;
//!   at most `max_idle` cells are idle, beyond that the least recently used one is freed. So a
//!   shard holds its cells in use plus at most `max_idle` others, and `index` maps the key of
//!   each to it.
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
use crate::sync::Arc;

/// "No waiter" in the intrusive queue links.
pub(crate) const NIL: u32 = u32::MAX;

/// Index of a cell in `Core::cells`; stable while the cell is in use.
pub(crate) type CellId = u32;
/// Index of a waiter in `Core::waiters`; stable until the waiter is collected or cancelled.
pub(crate) type WaiterId = u32;

/// Above this many slots, a shard whose cells all fall idle gives its tables' memory back.
const SHRINK_ABOVE: usize = 1024;

/// Idle cells a shard keeps by default (`Prison::new`, `Prison::with_shards`).
pub(crate) const DEFAULT_MAX_IDLE: usize = 128;

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
    /// On the idle list (not in use); then `idle_prev` and `idle_next` link it.
    pub(crate) idle: bool,
    pub(crate) idle_prev: CellId,
    pub(crate) idle_next: CellId,
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
    Granted(CellId),
    Queued(WaiterId),
    /// Not grantable now and the caller did not want to wait.
    Refused,
}

impl Cell {
    fn new(key: Key) -> Cell {
        Cell {
            key,
            nr_shared: [0; 2],
            nr_holders: 0,
            upgradable: false,
            exclusive: None,
            conversion: None,
            head: NIL,
            tail: NIL,
            nr_waiting: [0; NR_MODES],
            idle: false,
            idle_prev: NIL,
            idle_next: NIL,
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
    /// The idle list: least recently used first.
    pub(crate) idle_head: CellId,
    pub(crate) idle_tail: CellId,
    pub(crate) nr_idle: usize,
    pub(crate) max_idle: usize,
    /// Above this many cell slots, a shard with nothing in use shrinks its tables.
    shrink_above: usize,
    pub(crate) waiters: Slab<Waiter>,
    /// Parts of range and thin locks, in `seq` order; usually empty.
    pub(crate) fences: Vec<FencePart>,
    pub(crate) next_seq: u64,
    /// Filled by every operation, drained by the caller after it unlocks the shard.
    pub(crate) wakes: Vec<Wake>,
}

impl Default for Core {
    fn default() -> Core {
        Core::new(DEFAULT_MAX_IDLE)
    }
}

fn slot(index: usize) -> u32 {
    u32::try_from(index)
        .ok()
        .filter(|&i| i != NIL)
        .expect("more than 4G locks in one shard")
}

impl Core {
    /// An empty shard that keeps up to `max_idle` idle cells.
    pub(crate) fn new(max_idle: usize) -> Core {
        Core {
            index: HashMap::default(),
            cells: Slab::new(),
            idle_head: NIL,
            idle_tail: NIL,
            nr_idle: 0,
            max_idle,
            shrink_above: SHRINK_ABOVE.max(max_idle.saturating_mul(2)),
            waiters: Slab::new(),
            fences: Vec::new(),
            next_seq: 0,
            wakes: Vec::new(),
        }
    }

    /// A new request for `key` in `mode`: granted, queued (when a waker is given) or refused.
    #[inline(always)]
    pub(crate) fn acquire(&mut self, key: Hashed, mode: Mode, waker: Option<&Waker>) -> Acquired {
        // The fast path: a key whose cell is idle, or held by nobody. With no holder there is
        // no conversion either, with no queue nothing to overtake, and with no fence in the
        // shard nothing else to ask: the request is granted.
        if let Some(&cell) = self.index.get(&key) {
            let c = &mut self.cells[cell as usize];
            if c.nr_holders == 0 && c.head == NIL && self.fences.is_empty() {
                debug_assert!(c.conversion.is_none(), "{}: conversion by nobody", c.key);
                if c.idle {
                    self.unlink_idle(cell);
                }
                self.cells[cell as usize].hold(mode);
                return Acquired::Granted(cell);
            }
        }
        self.acquire_slow(key, mode, waker)
    }

    /// `acquire` for a new key, a key in use, or a shard with fences.
    #[inline(never)]
    fn acquire_slow(&mut self, key: Hashed, mode: Mode, waker: Option<&Waker>) -> Acquired {
        let cell = match self.index.get(&key) {
            Some(&cell) => {
                if self.cells[cell as usize].idle {
                    self.unlink_idle(cell);
                }
                cell
            }
            None => {
                let cell = slot(self.cells.insert(Cell::new(key.key)));
                self.index.insert(key, cell);
                cell
            }
        };
        let key = key.key;
        let c = &self.cells[cell as usize];
        if !c.holders_conflict(mode)
            && !c.queue_conflicts(mode)
            && !self.fence_blocks(key, mode, u64::MAX)
        {
            self.cells[cell as usize].hold(mode);
            return Acquired::Granted(cell);
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
    #[inline(always)]
    pub(crate) fn release(&mut self, cell: CellId, mode: Mode) {
        let c = &mut self.cells[cell as usize];
        c.unhold(mode);
        // The fast path: the last holder of a cell nobody waits for, in a shard without
        // fences, has nothing to settle; the cell just falls idle.
        if c.nr_holders == 0 && c.head == NIL && c.conversion.is_none() && self.fences.is_empty() {
            self.make_idle(cell);
            return;
        }
        self.settle(cell);
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

    /// Puts `cell` on the idle list if it is no longer in use.
    fn free_if_unused(&mut self, cell: CellId) {
        if self.cells[cell as usize].is_unused() {
            self.make_idle(cell);
        }
    }

    /// Puts unused `cell` on the idle list, freeing the least recently used idle cell if that
    /// makes one too many.
    #[inline(always)]
    fn make_idle(&mut self, cell: CellId) {
        self.link_idle(cell);
        if self.nr_idle > self.max_idle {
            self.free_idle(self.idle_head);
        }
        if self.cells.capacity() > self.shrink_above && self.nr_idle == self.cells.len() {
            self.shrink();
        }
    }

    /// Memory follows the locks in use, not the high-water mark of a burst: with nothing in
    /// use, drop the idle cells too and start again from empty tables.
    #[cold]
    fn shrink(&mut self) {
        self.cells = Slab::new();
        self.index = HashMap::default();
        (self.idle_head, self.idle_tail, self.nr_idle) = (NIL, NIL, 0);
        if self.waiters.is_empty() {
            self.waiters = Slab::new();
        }
    }

    /// Appends unused `cell` to the idle list, as its most recently used cell.
    #[inline(always)]
    fn link_idle(&mut self, cell: CellId) {
        let tail = self.idle_tail;
        let c = &mut self.cells[cell as usize];
        debug_assert!(!c.idle, "{}: idle twice", c.key);
        c.idle = true;
        c.idle_prev = tail;
        c.idle_next = NIL;
        match tail {
            NIL => self.idle_head = cell,
            _ => self.cells[tail as usize].idle_next = cell,
        }
        self.idle_tail = cell;
        self.nr_idle += 1;
    }

    /// Takes idle `cell` off the idle list: it is about to be used, or freed.
    #[inline(always)]
    fn unlink_idle(&mut self, cell: CellId) {
        let c = &mut self.cells[cell as usize];
        let (prev, next) = (c.idle_prev, c.idle_next);
        c.idle = false;
        c.idle_prev = NIL;
        c.idle_next = NIL;
        match prev {
            NIL => self.idle_head = next,
            _ => self.cells[prev as usize].idle_next = next,
        }
        match next {
            NIL => self.idle_tail = prev,
            _ => self.cells[next as usize].idle_prev = prev,
        }
        self.nr_idle -= 1;
    }

    /// Frees idle `cell`.
    #[inline(never)]
    fn free_idle(&mut self, cell: CellId) {
        self.unlink_idle(cell);
        let c = self.cells.remove(cell as usize);
        self.index.remove(&Hashed::new(c.key));
    }

    /// Number of cells in use.
    pub(crate) fn nr_cells(&self) -> usize {
        self.cells.len() - self.nr_idle
    }

    /// Number of idle cells kept for reuse.
    pub(crate) fn nr_idle_cells(&self) -> usize {
        self.nr_idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_and_unlock(core: &mut Core, key: Key) {
        let mode = Mode::Exclusive(Level::ReadWrite);
        let Acquired::Granted(cell) = core.acquire(Hashed::new(key), mode, None) else {
            panic!("{key} not granted");
        };
        core.release(cell, mode);
        core.check(0);
    }

    fn has_cell(core: &Core, key: Key) -> bool {
        core.index.contains_key(&Hashed::new(key))
    }

    #[test]
    fn the_least_recently_used_idle_cell_goes_first() {
        let mut core = Core::new(2);
        let (a, b, c) = (Key::virt(1, 1), Key::virt(1, 2), Key::data(1));
        lock_and_unlock(&mut core, a);
        lock_and_unlock(&mut core, b);
        lock_and_unlock(&mut core, a); // a is now the most recently used
        lock_and_unlock(&mut core, c); // so b goes
        assert!(has_cell(&core, a) && !has_cell(&core, b) && has_cell(&core, c));
        assert_eq!((core.nr_cells(), core.nr_idle_cells()), (0, 2));
        lock_and_unlock(&mut core, b); // b comes back in a new cell; a goes
        assert!(!has_cell(&core, a) && has_cell(&core, b) && has_cell(&core, c));
        assert_eq!(core.cells.len(), 2);
    }

    #[test]
    fn no_idle_cells_when_the_bound_is_zero() {
        let mut core = Core::new(0);
        lock_and_unlock(&mut core, Key::virt(0, 0));
        assert_eq!(
            (core.cells.len(), core.index.len(), core.nr_idle),
            (0, 0, 0)
        );
    }
}
