//! Whole-shard consistency check, for tests (`Prison::check_invariants`).
//!
//! It checks safety (no two conflicting holders, no granted fence beside a conflicting
//! holder) and liveness of the bookkeeping (nothing still waits that could be granted: such a
//! waiter would never be woken).

use std::fmt;

use crate::core::{Core, NIL};
use crate::key::{Hashed, Key, Mode, ALL_MODES, NR_MODES};
use crate::slots::{self, is_sealed, Holders, SlotId};

/// Where a check failed, formatted only if it does.
struct At {
    shard: usize,
    cell: usize,
    key: Key,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {} cell {} ({})", self.shard, self.cell, self.key)
    }
}

impl Core {
    pub(crate) fn check(&self, shard: usize) {
        assert_eq!(
            self.index.len(),
            self.cells.len(),
            "shard {shard}: index and cells differ"
        );
        let mut nr_queued = 0;
        for (id, c) in self.cells.iter() {
            let at = At {
                shard,
                cell: id,
                key: c.key,
            };
            assert_eq!(
                self.index.get(&Hashed::new(c.key)),
                Some(&(id as u32)),
                "{at}: not indexed"
            );
            let in_use = c.nr_shared != [0, 0]
                || c.upgradable
                || c.exclusive.is_some()
                || c.conversion.is_some()
                || c.head != NIL;
            assert_eq!(
                c.nr_holders,
                c.nr_shared[0]
                    + c.nr_shared[1]
                    + u32::from(c.upgradable)
                    + u32::from(c.exclusive.is_some()),
                "{at}: holder count is off"
            );
            assert_eq!(in_use, !c.is_unused(), "{at}: in use or not?");
            assert!(in_use, "{at}: unused cell not freed");
            for a in ALL_MODES {
                for b in ALL_MODES {
                    let both = a != b && c.holds(a) && c.holds(b);
                    assert!(
                        !(both && a.conflicts(b)),
                        "{at}: holders {a:?} and {b:?} coexist"
                    );
                }
            }
            if let Some(conversion) = &c.conversion {
                if conversion.granted {
                    assert_eq!(
                        c.exclusive,
                        Some(conversion.target),
                        "{at}: conversion lost"
                    );
                } else {
                    assert!(
                        c.upgradable || c.exclusive.is_some(),
                        "{at}: conversion by nobody"
                    );
                    assert!(
                        !c.shared_drained(conversion.target),
                        "{at}: conversion not granted"
                    );
                    assert!(conversion.waker.is_some(), "{at}: conversion without waker");
                }
            }
            for f in &self.fences {
                if f.granted && f.covers(c.key) {
                    let mode = Mode::Exclusive(f.level);
                    assert!(
                        !ALL_MODES.iter().any(|&m| c.holds(m) && m.conflicts(mode)),
                        "{at}: holder beside granted fence {}",
                        f.id
                    );
                }
            }
            // Walk the queue: links, counts, order, and that every waiter has a reason to wait.
            let mut counts = [0u32; NR_MODES];
            let mut stuck = [false; NR_MODES];
            let (mut prev, mut w, mut last_seq) = (NIL, c.head, None);
            while w != NIL {
                let waiter = &self.waiters[w as usize];
                assert_eq!(
                    waiter.cell, id as u32,
                    "{at}: waiter {w} in the wrong queue"
                );
                assert_eq!(waiter.prev, prev, "{at}: waiter {w} has a broken back link");
                assert!(!waiter.granted, "{at}: granted waiter {w} still queued");
                assert!(waiter.waker.is_some(), "{at}: waiter {w} cannot be woken");
                assert!(
                    last_seq < Some(waiter.seq),
                    "{at}: queue out of order at {w}"
                );
                let blocked = c.holders_conflict(waiter.mode)
                    || ALL_MODES
                        .iter()
                        .any(|&m| stuck[m.index()] && m.conflicts(waiter.mode))
                    || self.fence_blocks(c.key, waiter.mode, waiter.seq);
                assert!(
                    blocked,
                    "{at}: waiter {w} ({:?}) could be granted",
                    waiter.mode
                );
                stuck[waiter.mode.index()] = true;
                counts[waiter.mode.index()] += 1;
                nr_queued += 1;
                last_seq = Some(waiter.seq);
                prev = w;
                w = waiter.next;
            }
            assert_eq!(c.tail, prev, "{at}: tail is not the last waiter");
            assert_eq!(counts, c.nr_waiting, "{at}: waiting counts are off");
        }
        self.check_slots(shard);
        let nr_granted = self.waiters.iter().filter(|(_, w)| w.granted).count();
        assert_eq!(
            nr_queued + nr_granted,
            self.waiters.len(),
            "shard {shard}: stray waiters"
        );
        for (w, waiter) in self.waiters.iter() {
            if waiter.granted {
                let c = &self.cells[waiter.cell as usize];
                assert!(
                    c.holds(waiter.mode),
                    "shard {shard}: granted waiter {w} holds nothing"
                );
            }
        }
        for (i, f) in self.fences.iter().enumerate() {
            assert!(
                i == 0 || self.fences[i - 1].seq < f.seq,
                "shard {shard}: fences out of order"
            );
            assert!(
                f.seq < self.next_seq,
                "shard {shard}: fence {} from the future",
                f.id
            );
            assert!(
                f.granted || !self.fence_ready(i),
                "shard {shard}: fence {} could go",
                f.id
            );
            let earlier = &self.fences[..i];
            let overlapping = earlier
                .iter()
                .any(|g| g.thin == f.thin && g.first <= f.last && f.first <= g.last);
            assert!(
                !(f.granted && overlapping),
                "shard {shard}: fence {} granted too early",
                f.id
            );
        }
    }

    /// The slot table against the cells: every bound key bound once; an open slot's key has
    /// no cell and no covering fence; a sealed slot's key has a cell that names the slot and
    /// counts at least its holders (a slot holder's release reaches the slot before the cell).
    /// Fast-path holders come and go meanwhile, so each word is checked on its own snapshot.
    fn check_slots(&self, shard: usize) {
        let bound: Vec<(SlotId, Key, u64)> = self.slots.bound().collect();
        for (i, &(slot, key, word)) in bound.iter().enumerate() {
            assert!(
                !bound[..i].iter().any(|&(_, other, _)| other == key),
                "shard {shard}: {key} bound to two slots"
            );
            for a in ALL_MODES {
                for b in ALL_MODES {
                    let both = a != b && slots::holds(word, a) && slots::holds(word, b);
                    assert!(
                        !(both && a.conflicts(b)),
                        "shard {shard} slot {slot} ({key}): holders {a:?} and {b:?} coexist"
                    );
                }
            }
            let cell = self.index.get(&Hashed::new(key));
            if !is_sealed(word) {
                assert!(
                    cell.is_none(),
                    "shard {shard} slot {slot} ({key}): open beside a cell"
                );
                assert!(
                    !self.fence_covers(key),
                    "shard {shard} slot {slot} ({key}): open under a fence"
                );
                continue;
            }
            let &cell = cell
                .unwrap_or_else(|| panic!("shard {shard} slot {slot} ({key}): sealed, no cell"));
            let c = &self.cells[cell as usize];
            assert_eq!(
                c.slot, slot,
                "shard {shard} cell {cell} ({key}): slot differs"
            );
            let h = Holders::of(word);
            assert!(
                h.nr_shared[0] <= c.nr_shared[0] && h.nr_shared[1] <= c.nr_shared[1],
                "shard {shard} cell {cell} ({key}): slot has more shared holders"
            );
            assert!(
                !h.upgradable || c.upgradable,
                "shard {shard} cell {cell} ({key}): slot's upgradable holder lost"
            );
            assert!(
                h.exclusive.is_none() || c.exclusive == h.exclusive,
                "shard {shard} cell {cell} ({key}): slot's exclusive holder lost"
            );
        }
        for (id, c) in self.cells.iter() {
            if c.slot != NIL {
                assert!(
                    bound.iter().any(|&(slot, key, word)| slot == c.slot
                        && key == c.key
                        && is_sealed(word)),
                    "shard {shard} cell {id} ({}): its slot is not sealed with its key",
                    c.key
                );
            }
        }
    }
}
