//! Whole-shard consistency check, for tests (`Prison::check_invariants`).
//!
//! It checks safety (no two conflicting holders, no granted fence beside a conflicting
//! holder) and liveness of the bookkeeping (nothing still waits that could be granted: such a
//! waiter would never be woken).

use std::fmt;

use crate::core::{Core, NIL};
use crate::key::{Hashed, Key, Mode, ALL_MODES, NR_MODES};

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
            assert_eq!(
                in_use, !c.idle,
                "{at}: idle while in use, or unused and not idle"
            );
            if c.idle {
                assert_eq!(
                    c.nr_waiting, [0; NR_MODES],
                    "{at}: idle with waiters counted"
                );
                assert_eq!(c.tail, NIL, "{at}: idle with a queue tail");
            } else {
                assert_eq!(
                    (c.idle_prev, c.idle_next),
                    (NIL, NIL),
                    "{at}: linked on the idle list while in use"
                );
            }
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
        self.check_idle(shard);
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

    /// The idle list: well linked, least recently used first, within its bound, and holding
    /// exactly the cells marked idle.
    fn check_idle(&self, shard: usize) {
        let (mut prev, mut cell, mut nr) = (NIL, self.idle_head, 0);
        while cell != NIL {
            let c = self
                .cells
                .get(cell as usize)
                .unwrap_or_else(|| panic!("shard {shard}: idle list links freed cell {cell}"));
            assert!(
                c.idle,
                "shard {shard}: cell {cell} on the idle list is not idle"
            );
            assert_eq!(
                c.idle_prev, prev,
                "shard {shard}: idle cell {cell} has a broken back link"
            );
            nr += 1;
            assert!(
                nr <= self.nr_idle,
                "shard {shard}: idle list too long or cyclic"
            );
            prev = cell;
            cell = c.idle_next;
        }
        assert_eq!(
            self.idle_tail, prev,
            "shard {shard}: idle tail is not the last"
        );
        assert_eq!(nr, self.nr_idle, "shard {shard}: idle count is off");
        assert!(
            self.nr_idle <= self.max_idle,
            "shard {shard}: {} idle cells, above the bound {}",
            self.nr_idle,
            self.max_idle
        );
        let nr_marked = self.cells.iter().filter(|(_, c)| c.idle).count();
        assert_eq!(
            nr_marked, self.nr_idle,
            "shard {shard}: idle cells off the list"
        );
    }
}
