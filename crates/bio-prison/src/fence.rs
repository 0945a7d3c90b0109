//! Range and whole-thin locks ("fences") inside one shard.
//!
//! A fence is an exclusive lock at some `Level` on every virtual block of one thin in
//! `first..=last` (a whole-thin fence covers `0..=u64::MAX`). Single-block cells are spread
//! over shards by hash, so a fence is registered as one *part* in every shard; the fence is
//! granted when every part is.
//!
//! Invariants:
//! - Fences are registered one at a time, in every shard, under the prison's fence mutex, so
//!   all shards order them alike and two overlapping fences can never wait for each other.
//! - A part is granted when no earlier overlapping part of its shard is still registered, no
//!   holder of a covered cell conflicts with it, and no earlier-queued waiter of a covered
//!   cell does. A granted part stays granted until the fence is released.
//! - A request arriving after a fence (larger `seq`) and conflicting with it waits for its
//!   release, whether the fence is granted yet or not: a waiting fence holds back later
//!   requests as a waiting exclusive lock does, so quiescing cannot starve.
//! - An upgradable or exclusive holder a fence already waits for may still convert; a shared
//!   holder may not become upgradable under any covering fence (see `Core::try_upgradable`).
//!   So a part's holders only ever lose conflicts once it is granted.
//! - The common single-block path pays for fences only with `fences.is_empty()`.

use std::task::Waker;

use crate::core::{CellId, Core, Wake};
use crate::key::{Hashed, Key, Level, Mode, ThinId};
use crate::slots::{is_sealed, SlotId};
use crate::sync::Mutex;

/// One shard's share of a fence.
#[derive(Debug)]
pub(crate) struct FencePart {
    pub(crate) id: u64,
    pub(crate) seq: u64,
    pub(crate) thin: ThinId,
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) level: Level,
    pub(crate) granted: bool,
    pub(crate) shared: crate::sync::Arc<FenceShared>,
}

impl FencePart {
    pub(crate) fn covers(&self, key: Key) -> bool {
        matches!(key, Key::Virtual(thin, vblock)
            if thin == self.thin && (self.first..=self.last).contains(&vblock.0))
    }

    fn overlaps(&self, other: &FencePart) -> bool {
        self.thin == other.thin && self.first <= other.last && other.first <= self.last
    }
}

/// What the fence's future and its parts in every shard share: how many parts still wait.
#[derive(Debug)]
pub(crate) struct FenceShared {
    state: Mutex<FenceWait>,
}

#[derive(Debug)]
struct FenceWait {
    nr_parts_waiting: usize,
    waker: Option<Waker>,
}

impl FenceShared {
    pub(crate) fn new(nr_parts: usize) -> FenceShared {
        FenceShared {
            state: Mutex::new(FenceWait {
                nr_parts_waiting: nr_parts,
                waker: None,
            }),
        }
    }

    /// Called (outside any shard lock) when one part is granted.
    pub(crate) fn part_granted(&self) {
        let waker = {
            let mut state = self.state.lock();
            assert!(state.nr_parts_waiting > 0, "fence part granted twice");
            state.nr_parts_waiting -= 1;
            if state.nr_parts_waiting > 0 {
                return;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether every part is granted; if not, `waker` is woken when they are.
    pub(crate) fn poll(&self, waker: &Waker) -> bool {
        let mut state = self.state.lock();
        if state.nr_parts_waiting == 0 {
            return true;
        }
        if !state.waker.as_ref().is_some_and(|old| old.will_wake(waker)) {
            state.waker = Some(waker.clone());
        }
        false
    }
}

impl Core {
    /// Whether a fence registered before `seq` keeps a request for `key` in `mode` waiting.
    pub(crate) fn fence_blocks(&self, key: Key, mode: Mode, seq: u64) -> bool {
        !self.fences.is_empty()
            && self
                .fences
                .iter()
                .any(|f| f.seq < seq && f.covers(key) && Mode::Exclusive(f.level).conflicts(mode))
    }

    /// Whether a registered fence covers `key` (every fence conflicts with an upgradable
    /// holder).
    pub(crate) fn fence_covers(&self, key: Key) -> bool {
        !self.fences.is_empty() && self.fences.iter().any(|f| f.covers(key))
    }

    /// Registers this shard's part of a fence; it may be granted at once (see `wakes`).
    ///
    /// First it takes every covered key off the fast path: a covered slot with holders is
    /// sealed and its key taken over by a cell the fence can wait on; one without is vacated.
    /// While the fence is registered no covered key binds a slot (`Core::acquire`).
    pub(crate) fn add_fence(&mut self, mut part: FencePart) {
        part.seq = self.next_seq;
        part.granted = false;
        self.next_seq += 1;
        let covered: Vec<(SlotId, Key)> = self
            .slots
            .bound()
            .filter(|&(_, key, word)| !is_sealed(word) && part.covers(key))
            .map(|(slot, key, _)| (slot, key))
            .collect();
        self.fences.push(part);
        for (slot, key) in covered {
            let cell = self.take_over(slot, Hashed::new(key));
            // Without holders it is freed at once, vacating the slot (the fence covers it).
            self.free_if_unused(cell);
        }
        self.settle_fences();
    }

    /// Removes this shard's part of fence `id` and lets through what it held back.
    pub(crate) fn remove_fence(&mut self, id: u64) {
        let Some(i) = self.fences.iter().position(|f| f.id == id) else {
            return;
        };
        let part = self.fences.remove(i);
        let blocked: Vec<CellId> = self
            .cells
            .iter()
            .filter(|(_, c)| c.head != crate::core::NIL && part.covers(c.key))
            .map(|(id, _)| id as CellId)
            .collect();
        for cell in blocked {
            self.settle_cell(cell);
        }
        self.settle_fences();
    }

    /// Grants every part that nothing holds back any more.
    pub(crate) fn settle_fences(&mut self) {
        for i in 0..self.fences.len() {
            if !self.fences[i].granted && self.fence_ready(i) {
                let part = &mut self.fences[i];
                part.granted = true;
                self.wakes.push(Wake::Fence(part.shared.clone()));
            }
        }
    }

    /// Whether part `i` may be granted now.
    pub(crate) fn fence_ready(&self, i: usize) -> bool {
        let f = &self.fences[i];
        if self.fences[..i].iter().any(|g| g.overlaps(f)) {
            return false;
        }
        let mode = Mode::Exclusive(f.level);
        self.cells.iter().all(|(_, c)| {
            if !f.covers(c.key) {
                return true;
            }
            if c.holders_conflict(mode) {
                return false;
            }
            let mut w = c.head;
            while w != crate::core::NIL {
                let waiter = &self.waiters[w as usize];
                if waiter.seq < f.seq && waiter.mode.conflicts(mode) {
                    return false;
                }
                w = waiter.next;
            }
            true
        })
    }
}
