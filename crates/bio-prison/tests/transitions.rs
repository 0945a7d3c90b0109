//! Every lock transition, one scenario each, polled by hand.
#![cfg(not(loom))] // loom's mutex only works inside loom::model: see tests/loom.rs

mod common;

use bio_prison::{Access, Error, Key, Level, Prison, ThinId, VBlock};
use common::{now, Probe};

const R: Access = Access::Read;
const W: Access = Access::Write;
const LW: Level = Level::Write;
const LRW: Level = Level::ReadWrite;

fn k(vblock: u64) -> Key {
    Key::virt(1, vblock)
}

fn done(prison: &Prison) {
    prison.check_invariants();
    assert_eq!(prison.nr_cells(), 0, "cells left behind");
}

#[test]
fn shared_holders_coexist_and_exclusive_waits_for_all() {
    let p = Prison::new();
    let a = now(p.shared(k(0), R));
    let b = now(p.shared(k(0), W));
    let mut ex = Probe::new(p.exclusive(k(0), LRW));
    ex.pending();
    drop(a);
    assert!(!ex.woken());
    p.check_invariants();
    drop(b);
    assert!(ex.woken());
    let g = ex.ready();
    assert_eq!((g.key(), g.level()), (k(0), LRW));
    drop(g);
    done(&p);
}

#[test]
fn exclusive_keeps_everyone_out_and_release_wakes() {
    let p = Prison::new();
    let ex = now(p.exclusive(k(3), LRW));
    let mut sh = Probe::new(p.shared(k(3), R));
    let mut up = Probe::new(p.upgradable(k(3)));
    let mut ex2 = Probe::new(p.exclusive(k(3), LW));
    sh.pending();
    up.pending();
    ex2.pending();
    assert!(p.try_shared(k(3), R).is_none());
    assert!(
        now(p.shared(k(4), R)).key() == k(4),
        "other keys are independent"
    );
    drop(ex);
    assert!(sh.woken() && up.woken() && !ex2.woken());
    let (s, u) = (sh.ready(), up.ready());
    ex2.pending();
    drop(s);
    assert!(!ex2.woken());
    drop(u);
    assert!(ex2.woken());
    drop(ex2.ready());
    done(&p);
}

#[test]
fn waiting_exclusive_holds_back_later_shared() {
    let p = Prison::new();
    let s1 = now(p.shared(k(0), R));
    let mut ex = Probe::new(p.exclusive(k(0), LRW));
    ex.pending();
    let mut s2 = Probe::new(p.shared(k(0), R));
    s2.pending();
    assert!(p.try_shared(k(0), R).is_none(), "writers must not starve");
    drop(s1);
    assert!(ex.woken() && !s2.woken());
    let g = ex.ready();
    s2.pending();
    drop(g);
    assert!(s2.woken());
    drop(s2.ready());
    done(&p);
}

#[test]
fn fifo_between_conflicting_requests() {
    let p = Prison::new();
    let e1 = now(p.exclusive(k(0), LRW));
    let mut e2 = Probe::new(p.exclusive(k(0), LRW));
    let mut s = Probe::new(p.shared(k(0), R));
    let mut e3 = Probe::new(p.exclusive(k(0), LRW));
    e2.pending();
    s.pending();
    e3.pending();
    drop(e1);
    assert!(e2.woken() && !s.woken() && !e3.woken());
    drop(e2.ready());
    assert!(s.woken() && !e3.woken());
    drop(s.ready());
    assert!(e3.woken());
    drop(e3.ready());
    done(&p);
}

#[test]
fn write_level_lets_readers_through_and_promotion_drains_them() {
    let p = Prison::new();
    let ex = now(p.exclusive(k(0), LW));
    let r1 = now(p.shared(k(0), R));
    let mut w1 = Probe::new(p.shared(k(0), W));
    w1.pending();
    // A reader arriving behind a queued writer is not held back: it conflicts with neither.
    let r2 = p
        .try_shared(k(0), R)
        .expect("readers pass a write-level lock");
    let mut promote = Probe::new(ex.promote(LRW));
    promote.pending();
    let mut r3 = Probe::new(p.shared(k(0), R));
    r3.pending();
    drop(r1);
    assert!(!promote.woken());
    drop(r2);
    assert!(promote.woken());
    let ex = promote.ready();
    assert_eq!(ex.level(), LRW);
    p.check_invariants();
    drop(ex);
    assert!(w1.woken() && r3.woken());
    drop((w1.ready(), r3.ready()));
    done(&p);
}

#[test]
fn promotion_to_same_or_lower_level_is_immediate() {
    let p = Prison::new();
    let ex = now(p.exclusive(k(0), LRW));
    let ex = now(ex.promote(LW));
    assert_eq!(ex.level(), LRW);
    let ex = now(ex.promote(LRW));
    drop(ex);
    done(&p);
}

#[test]
fn upgradable_coexists_with_shared_and_upgrades_once_they_drain() {
    let p = Prison::new();
    let s = now(p.shared(k(0), W));
    let u = now(p.upgradable(k(0)));
    let s2 = now(p.shared(k(0), R));
    let mut u2 = Probe::new(p.upgradable(k(0)));
    u2.pending();
    let mut up = Probe::new(u.upgrade(LRW));
    up.pending();
    let mut late = Probe::new(p.shared(k(0), R));
    late.pending(); // a pending upgrade keeps new shared holders out
    drop(s);
    assert!(!up.woken());
    drop(s2);
    assert!(up.woken());
    let ex = up.ready();
    assert_eq!(ex.level(), LRW);
    late.pending();
    u2.pending();
    drop(ex);
    assert!(late.woken() && u2.woken());
    drop((late.ready(), u2.ready()));
    done(&p);
}

#[test]
fn upgrade_to_write_level_keeps_readers() {
    let p = Prison::new();
    let r = now(p.shared(k(0), R));
    let u = now(p.upgradable(k(0)));
    let ex = now(u.upgrade(LW));
    let r2 = p.try_shared(k(0), R).expect("readers pass");
    assert!(p.try_shared(k(0), W).is_none());
    drop((r, r2, ex));
    done(&p);
}

#[test]
fn shared_upgrade_races_fail_fast_and_release() {
    let p = Prison::new();
    let a = now(p.shared(k(0), W));
    let b = now(p.shared(k(0), W));
    let mut up_a = Probe::new(a.upgrade(LRW).expect("first upgrader wins"));
    up_a.pending();
    match b.upgrade(LRW) {
        Err(Error::UpgradeRaced { key }) => assert_eq!(key, k(0)),
        other => panic!("second upgrader must lose, got {other:?}"),
    }
    assert!(up_a.woken(), "the loser's shared lock was released");
    let ex = up_a.ready();
    let mut again = Probe::new(p.shared(k(0), W));
    again.pending();
    let s = ex.downgrade(W);
    assert!(again.woken());
    drop((s, again.ready()));
    done(&p);
}

#[test]
fn try_upgradable_keeps_the_shared_lock_on_refusal() {
    let p = Prison::new();
    let u = now(p.upgradable(k(0)));
    let s = now(p.shared(k(0), R));
    let s = s
        .try_upgradable()
        .expect_err("already an upgradable holder");
    assert_eq!(s.access(), R);
    drop(u);
    let u = s.try_upgradable().expect("now it can");
    let s = u.downgrade(W);
    assert_eq!(s.access(), W);
    drop(s);
    done(&p);
}

#[test]
fn downgrades_let_waiters_in() {
    let p = Prison::new();
    let ex = now(p.exclusive(k(0), LRW));
    let mut r = Probe::new(p.shared(k(0), R));
    let mut u = Probe::new(p.upgradable(k(0)));
    r.pending();
    u.pending();
    let s = ex.downgrade(W);
    assert!(r.woken() && u.woken());
    let (r, u) = (r.ready(), u.ready());
    let s2 = u.downgrade(R);
    drop((s, r, s2));
    done(&p);
}

#[test]
fn dropping_a_queued_future_lets_later_ones_through() {
    let p = Prison::new();
    let s = now(p.shared(k(0), R));
    let mut ex = Probe::new(p.exclusive(k(0), LRW));
    ex.pending();
    let mut s2 = Probe::new(p.shared(k(0), R));
    s2.pending();
    drop(ex);
    assert!(
        s2.woken(),
        "the cancelled writer no longer holds readers back"
    );
    drop((s, s2.ready()));
    done(&p);
}

#[test]
fn dropping_a_granted_but_unpolled_future_releases() {
    let p = Prison::new();
    let e1 = now(p.exclusive(k(0), LRW));
    let mut e2 = Probe::new(p.exclusive(k(0), LRW));
    let mut e3 = Probe::new(p.exclusive(k(0), LRW));
    e2.pending();
    e3.pending();
    drop(e1);
    assert!(e2.woken());
    drop(e2); // granted, never collected
    assert!(e3.woken());
    drop(e3.ready());
    done(&p);
}

#[test]
fn dropping_a_future_before_its_first_poll_does_nothing() {
    let p = Prison::new();
    let e = now(p.exclusive(k(0), LRW));
    drop(p.shared(k(0), R));
    drop(p.exclusive_thin(ThinId(1), LRW));
    drop(e);
    done(&p);
}

#[test]
fn dropping_a_conversion_releases_the_lock() {
    let p = Prison::new();
    // Waiting conversion.
    let s = now(p.shared(k(0), W));
    let u = now(p.upgradable(k(0)));
    let mut up = Probe::new(u.upgrade(LRW));
    up.pending();
    let mut r = Probe::new(p.shared(k(0), R));
    r.pending();
    drop(up);
    assert!(r.woken());
    drop((s, r.ready()));
    // Never-polled conversion.
    let ex = now(p.exclusive(k(0), LW));
    drop(ex.promote(LRW));
    let r = p
        .try_shared(k(0), W)
        .expect("promotion dropped with its lock");
    drop(r);
    // Granted but uncollected conversion.
    let r = now(p.shared(k(0), R));
    let ex = now(p.exclusive(k(0), LW));
    let mut promote = Probe::new(ex.promote(LRW));
    promote.pending();
    drop(r);
    assert!(promote.woken());
    drop(promote);
    done(&p);
}

#[test]
fn thin_lock_quiesces_one_thin_only() {
    let p = Prison::new();
    let held: Vec<_> = (0..20).map(|v| now(p.shared(k(v), W))).collect();
    let other_thin = now(p.exclusive(Key::virt(2, 5), LRW));
    let mut fence = Probe::new(p.exclusive_thin(ThinId(1), LRW));
    fence.pending();
    let mut newcomer = Probe::new(p.shared(k(100), R));
    newcomer.pending();
    assert!(
        p.try_shared(Key::virt(2, 6), W).is_some(),
        "other thins are not quiesced"
    );
    assert!(
        p.try_exclusive(Key::data(5), LRW).is_some(),
        "data keys are not covered"
    );
    for g in held {
        assert!(!fence.woken());
        p.check_invariants();
        drop(g);
    }
    assert!(fence.woken());
    let f = fence.ready();
    assert_eq!(
        (f.thin(), f.blocks(), f.level()),
        (ThinId(1), Some((0, u64::MAX)), LRW)
    );
    newcomer.pending();
    p.check_invariants();
    drop(f);
    assert!(newcomer.woken());
    drop((newcomer.ready(), other_thin));
    done(&p);
}

#[test]
fn range_lock_covers_its_blocks_only() {
    let p = Prison::new();
    let inside = now(p.exclusive(k(10), LRW));
    let below = now(p.exclusive(k(9), LRW));
    let mut fence = Probe::new(p.exclusive_range(ThinId(1), VBlock(10)..VBlock(20), LRW));
    fence.pending();
    assert!(p.try_shared(k(20), R).is_some(), "end is exclusive");
    assert!(p.try_shared(k(19), R).is_none(), "last block is covered");
    drop(below);
    assert!(!fence.woken());
    drop(inside);
    let f = fence.ready();
    assert_eq!(f.blocks(), Some((10, 19)));
    assert!(p.try_exclusive(k(9), LRW).is_some());
    drop(f);
    done(&p);
}

#[test]
fn write_level_thin_lock_lets_readers_through() {
    let p = Prison::new();
    let r = now(p.shared(k(1), R));
    let w = now(p.shared(k(2), W));
    let mut fence = Probe::new(p.exclusive_thin(ThinId(1), LW));
    fence.pending();
    let r2 = p
        .try_shared(k(3), R)
        .expect("reads pass a write-level quiesce");
    drop(w);
    let f = fence.ready();
    assert!(p.try_shared(k(3), W).is_none());
    assert!(p.try_upgradable(k(3)).is_none());
    let r3 = now(p.shared(k(3), R));
    let r3 = r3
        .try_upgradable()
        .expect_err("a granted fence refuses upgrades");
    drop((r, r2, r3, f));
    done(&p);
}

#[test]
fn overlapping_fences_queue_and_disjoint_ones_do_not() {
    let p = Prison::new();
    let f1 = now(p.exclusive_range(ThinId(1), VBlock(0)..VBlock(10), LRW));
    let f2 = now(p.exclusive_range(ThinId(1), VBlock(10)..VBlock(20), LRW));
    let f3 = now(p.exclusive_thin(ThinId(2), LRW));
    let mut f4 = Probe::new(p.exclusive_range(ThinId(1), VBlock(5)..VBlock(6), LW));
    f4.pending();
    let mut f5 = Probe::new(p.exclusive_thin(ThinId(1), LW));
    f5.pending();
    drop(f1);
    assert!(f4.woken() && !f5.woken());
    let f4 = f4.ready();
    drop(f2);
    f5.pending();
    drop(f4);
    assert!(f5.woken());
    drop((f5.ready(), f3));
    done(&p);
}

#[test]
fn fence_waits_for_earlier_queued_requests() {
    let p = Prison::new();
    let e = now(p.exclusive(k(1), LRW));
    let mut s = Probe::new(p.shared(k(1), W));
    s.pending();
    let mut fence = Probe::new(p.exclusive_thin(ThinId(1), LRW));
    fence.pending();
    let mut late = Probe::new(p.shared(k(1), R));
    late.pending();
    drop(e);
    assert!(
        s.woken() && !fence.woken() && !late.woken(),
        "first come, first served"
    );
    let s = s.ready();
    drop(s);
    assert!(fence.woken());
    let f = fence.ready();
    late.pending();
    drop(f);
    drop(late.ready());
    done(&p);
}

#[test]
fn dropping_a_waiting_fence_lets_held_back_requests_through() {
    let p = Prison::new();
    let s = now(p.shared(k(1), W));
    let mut fence = Probe::new(p.exclusive_range(ThinId(1), VBlock(0)..VBlock(4), LRW));
    fence.pending();
    let mut blocked = Probe::new(p.shared(k(2), R));
    blocked.pending();
    drop(fence);
    assert!(blocked.woken());
    drop((blocked.ready(), s));
    done(&p);
}

#[test]
fn under_a_waiting_fence_upgradable_holders_convert_but_shared_ones_cannot_upgrade() {
    let p = Prison::new();
    let u = now(p.upgradable(k(1)));
    let s = now(p.shared(k(2), W));
    let mut fence = Probe::new(p.exclusive_thin(ThinId(1), LRW));
    fence.pending();
    let ex = now(u.upgrade(LRW));
    let s = s
        .try_upgradable()
        .expect_err("a registered fence refuses new upgraders");
    match s.upgrade(LRW) {
        Err(Error::UpgradeRaced { key }) => assert_eq!(key, k(2)),
        other => panic!("expected a lost race, got {other:?}"),
    }
    let mut retry = Probe::new(p.shared(k(2), W));
    retry.pending(); // queues behind the fence
    let s = ex.downgrade(W);
    drop(s);
    assert!(fence.woken());
    drop(fence.ready());
    drop(retry.ready());
    done(&p);
}

#[test]
fn empty_range_is_granted_at_once() {
    let p = Prison::new();
    let _e = now(p.exclusive(k(5), LRW));
    let f = now(p.exclusive_range(ThinId(1), VBlock(5)..VBlock(5), LRW));
    assert_eq!(f.blocks(), None);
    let f2 = now(p.exclusive_range(ThinId(1), VBlock(7)..VBlock(3), LRW));
    drop((f, f2));
}

#[test]
fn try_variants_never_queue() {
    let p = Prison::new();
    let e = p.try_exclusive(k(0), LRW).expect("free");
    assert!(p.try_exclusive(k(0), LRW).is_none());
    assert!(p.try_upgradable(k(0)).is_none());
    p.check_invariants();
    drop(e);
    let u = p.try_upgradable(k(0)).expect("free");
    assert!(p.try_shared(k(0), W).is_some());
    drop(u);
    done(&p);
}

#[test]
fn one_shard_behaves_like_many() {
    let p = Prison::with_shards(1);
    assert_eq!(p.nr_shards(), 1);
    let s = now(p.shared(k(1), W));
    let mut fence = Probe::new(p.exclusive_thin(ThinId(1), LRW));
    fence.pending();
    drop(s);
    drop(fence.ready());
    assert_eq!(Prison::with_shards(5).nr_shards(), 8);
    done(&p);
}

#[test]
fn memory_follows_locks_in_use() {
    let p = Prison::with_shards(1);
    // Past the size at which a shard gives its cell tables back (miri is too slow for that).
    let nr = if cfg!(miri) { 300 } else { 5000 };
    let held: Vec<_> = (0..nr).map(|v| now(p.shared(k(v), R))).collect();
    assert_eq!(p.nr_cells(), nr as usize);
    p.check_invariants();
    drop(held);
    done(&p);
    // What stays is the fixed slot table, some of it bound to keys just unlocked.
    let idle = p.nr_idle_cells();
    assert!(
        (1..=bio_prison::DEFAULT_IDLE_CELLS_PER_SHARD).contains(&idle),
        "{idle} idle slots"
    );
}

#[test]
fn idle_slots_stay_bounded_and_are_reused() {
    let bound = 4; // two buckets of two slots
    let p = Prison::with_shards_and_idle_cells(1, bound);
    // Unlocked keys stay bound to their slots, never more than the table holds.
    for v in 0..10 {
        drop(now(p.exclusive(k(v), LRW)));
        p.check_invariants();
        assert_eq!(p.nr_cells(), 0);
        assert!((1..=bound).contains(&p.nr_idle_cells()), "key {v}");
    }
    // The last key locked is still bound: locking it again takes its idle slot...
    let idle = p.nr_idle_cells();
    let g = now(p.shared(k(9), R));
    assert_eq!((p.nr_cells(), p.nr_idle_cells()), (1, idle - 1));
    p.check_invariants();
    drop(g);
    assert_eq!((p.nr_cells(), p.nr_idle_cells()), (0, idle));
    // ...and while every slot is held, further keys are locked in cells, and freed with them.
    let held: Vec<_> = (100..100 + 3 * bound as u64)
        .map(|v| now(p.shared(k(v), W)))
        .collect();
    assert_eq!((p.nr_cells(), p.nr_idle_cells()), (3 * bound, 0));
    p.check_invariants();
    drop(held);
    done(&p);
    assert!(p.nr_idle_cells() <= bound);
}

#[test]
fn idle_slots_behave_like_fresh_ones() {
    for bound in [0, 1, 2, bio_prison::DEFAULT_IDLE_CELLS_PER_SHARD] {
        let p = Prison::with_shards_and_idle_cells(2, bound);
        // Leave idle slots behind, then run every kind of conflict over the same keys.
        for v in 0..4 {
            drop(now(p.shared(k(v), R)));
        }
        let s = now(p.shared(k(0), R));
        let mut ex = Probe::new(p.exclusive(k(0), LRW));
        ex.pending();
        let fence_guard = now(p.exclusive_range(ThinId(1), VBlock(1)..VBlock(3), LW));
        assert!(p.try_shared(k(1), W).is_none(), "blocked by the fence");
        assert!(
            p.try_shared(k(1), R).is_some(),
            "readers pass a Level::Write fence"
        );
        drop(fence_guard);
        let u = now(p.upgradable(k(2)));
        let e = now(u.upgrade(LRW));
        assert!(p.try_shared(k(2), R).is_none());
        drop(e);
        drop(s);
        assert!(ex.woken());
        drop(ex.ready());
        p.check_invariants();
        // Whole buckets of two, a power of two of them, per shard.
        let per_shard = bound.div_ceil(2).next_power_of_two() * 2;
        assert!(p.nr_idle_cells() <= 2 * per_shard, "bound {bound}");
        done(&p);
    }
}

#[test]
fn slot_holders_follow_their_key_into_the_core_and_back() {
    let p = Prison::with_shards(1);
    // Two shared holders on the fast path; an exclusive request queues, sealing the slot.
    let (a, b) = (now(p.shared(k(5), R)), now(p.shared(k(5), W)));
    let mut ex = Probe::new(p.exclusive(k(5), LRW));
    ex.pending();
    assert_eq!(p.nr_idle_cells(), 0);
    p.check_invariants();
    // A holder whose slot is sealed upgrades through the core (and becomes its holder).
    let u = a.try_upgradable().expect("no other upgradable holder");
    p.check_invariants();
    let u = u.downgrade(R);
    drop(b);
    ex.pending();
    drop(u);
    let e = ex.ready();
    p.check_invariants();
    // Shared requests behind the exclusive holder wait; once all is released, the key is
    // back on the fast path.
    let mut s = Probe::new(p.shared(k(5), R));
    s.pending();
    drop(e);
    drop(s.ready());
    done(&p);
    assert_eq!(p.nr_idle_cells(), 1);
    let g = p.try_exclusive(k(5), LRW).expect("free");
    assert_eq!(p.nr_idle_cells(), 0, "relocked in its slot");
    drop(g);
    done(&p);
}

#[test]
fn a_range_lock_takes_covered_slots_off_the_fast_path() {
    let p = Prison::with_shards(2);
    let held = now(p.shared(k(1), W));
    drop(now(p.shared(k(2), W))); // idle in its slot
    let mut fence = Probe::new(p.exclusive_range(ThinId(1), VBlock(0)..VBlock(10), LRW));
    fence.pending();
    p.check_invariants();
    assert!(
        p.try_shared(k(2), R).is_none(),
        "an idle slot under the fence"
    );
    assert!(p.try_shared(k(20), R).is_some(), "outside the range");
    // The fast-path holder's release reaches the fence.
    drop(held);
    let guard = fence.ready();
    p.check_invariants();
    assert!(p.try_shared(k(1), R).is_none());
    drop(guard);
    drop(now(p.exclusive(k(1), LRW)));
    done(&p);
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Prison>();
    check::<bio_prison::SharedGuard<'static>>();
    check::<bio_prison::ExclusiveGuard<'static>>();
    check::<bio_prison::UpgradableGuard<'static>>();
    check::<bio_prison::FenceGuard<'static>>();
    check::<bio_prison::SharedFuture<'static>>();
    check::<bio_prison::Convert<'static>>();
    check::<bio_prison::FenceFuture<'static>>();
}
