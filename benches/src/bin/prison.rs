//! bio-prison: the cost of a lock on the I/O path, beside the obvious alternative, a
//! `HashMap` of `parking_lot::RwLock`s (pre-populated, so it needs no lock of its own; it has
//! no levels, no upgrade, no range locks, no fairness between readers and writers).
//!
//! Figures, in ns per acquire+release, each the median over rounds; each RATIO is the median
//! of the per-round ratios, ours and the baseline alternating round by round (which goes
//! first alternates too), so that a noisy neighbour or a frequency change hits both alike:
//! - uncontended shared and exclusive: one thread cycling through 1024 keys, futures polled
//!   once with a no-op waker (they never wait);
//! - two threads contending for one key (shared, then exclusive): wall time over all
//!   operations of both threads; waiting futures park the thread and are woken by unpark.
//!   The exclusive case cannot meet its goal by design: the prison is first come, first
//!   served, so a request that finds the key held queues at once and each release hands the
//!   lock to the queued thread, which must be woken; parking_lot spins before it parks and
//!   lets whichever thread gets there first take the lock (even `unlock_fair` hands over
//!   only to a parked waiter, so a spinning one still races), so one thread takes it again
//!   and again while the other spins;
//! - two threads on disjoint keys: what one atomic word per key buys (no shared mutex);
//! - uncontended exclusive on ever new keys (`prison_exclusive_distinct_keys`): every lock
//!   is of a key never locked before, so no idle slot has it and each lock binds a slot under
//!   the shard's mutex (evicting an idle key); the baseline map is pre-filled with all those
//!   keys, so it still only looks up. The same work for both, just many more keys; printed as
//!   figures only.
//!
//! `RATIO value` is baseline ns / our ns: above 1 we are faster.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use bio_prison::{Access, Key, Level, Prison};
use parking_lot::RwLock;
use ublk_thin_benches::{figure, median, ratio, Options};

const NR_KEYS: u64 = 1024;
/// Rounds per side; odd, for a plain median.
const NR_ROUNDS: usize = 9;

/// Polls once with a no-op waker: for futures that must not wait. Inlined like the
/// baseline's lock calls (and like an `.await` in an async fn), so that both sides are
/// measured as the compiler lays them out in a caller, not behind a generic helper call.
#[inline(always)]
fn now<F: Future>(fut: F) -> F::Output {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an uncontended lock had to wait"),
    }
}

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `fut` on this thread, parking while it waits; inlined as `now` is.
#[inline(always)]
fn block_on<F: Future>(fut: F, waker: &Waker) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(waker);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        thread::park();
    }
}

fn keys() -> Vec<Key> {
    (0..NR_KEYS)
        .map(|v| Key::virt((v % 4) as u32, v * 7))
        .collect()
}

fn baseline_map(keys: &[Key]) -> HashMap<Key, RwLock<()>> {
    keys.iter().map(|&k| (k, RwLock::new(()))).collect()
}

/// One round of `op` on this thread: its time.
fn round(nr_iters: u64, op: &mut impl FnMut(u64)) -> Duration {
    let start = Instant::now();
    for i in 0..nr_iters {
        op(i);
    }
    start.elapsed()
}

/// One round of `op(thread, i)` on two threads at once: the wall time.
fn round_two_threads(nr_iters: u64, op: &(impl Fn(usize, u64, &Waker) + Sync)) -> Duration {
    let barrier = Barrier::new(2);
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..2 {
            let barrier = &barrier;
            s.spawn(move || {
                let waker = Waker::from(Arc::new(Unpark(thread::current())));
                barrier.wait();
                for i in 0..nr_iters {
                    op(t, i, &waker);
                }
            });
        }
    });
    start.elapsed()
}

/// Runs `ours` and `base` (each returning one round's time for `nr_ops` operations) in
/// alternating rounds and prints the figures and the ratio.
fn compare(
    name: &str,
    nr_ops: u64,
    mut ours: impl FnMut() -> Duration,
    mut base: impl FnMut() -> Duration,
) {
    let (mut our_rounds, mut base_rounds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..NR_ROUNDS {
        let (o, b) = if r % 2 == 0 {
            let o = ours();
            (o, base())
        } else {
            let b = base();
            (ours(), b)
        };
        ratios.push(b.as_secs_f64() / o.as_secs_f64());
        our_rounds.push(o);
        base_rounds.push(b);
    }
    let ns = |rounds: Vec<Duration>| median(rounds).as_nanos() as f64 / nr_ops as f64;
    figure(&format!("{name}_ns"), ns(our_rounds), "ns");
    figure(&format!("{name}_rwlock_map_ns"), ns(base_rounds), "ns");
    ratios.sort_by(f64::total_cmp);
    ratio(name, ratios[ratios.len() / 2], 1.0);
}

fn main() {
    let opts = Options::from_args();
    let nr_iters: u64 = if opts.quick { 20_000 } else { 1_000_000 };
    let nr_contended: u64 = if opts.quick { 5_000 } else { 200_000 };
    let keys = keys();
    let map = baseline_map(&keys);
    let prison = Prison::new();
    let key = |i: u64| keys[(i % NR_KEYS) as usize];

    compare(
        "prison_shared_uncontended",
        nr_iters,
        || {
            round(nr_iters, &mut |i| {
                drop(now(prison.shared(key(i), Access::Read)))
            })
        },
        || round(nr_iters, &mut |i| drop(map[&key(i)].read())),
    );
    compare(
        "prison_exclusive_uncontended",
        nr_iters,
        || {
            round(nr_iters, &mut |i| {
                drop(now(prison.exclusive(key(i), Level::ReadWrite)))
            })
        },
        || round(nr_iters, &mut |i| drop(map[&key(i)].write())),
    );

    let hot = key(0);
    compare(
        "prison_shared_contended_2t",
        2 * nr_contended,
        || {
            round_two_threads(nr_contended, &|_, _, w| {
                drop(block_on(prison.shared(hot, Access::Read), w));
            })
        },
        || round_two_threads(nr_contended, &|_, _, _| drop(map[&hot].read())),
    );
    compare(
        "prison_exclusive_contended_2t",
        2 * nr_contended,
        || {
            round_two_threads(nr_contended, &|_, _, w| {
                drop(block_on(prison.exclusive(hot, Level::ReadWrite), w));
            })
        },
        || round_two_threads(nr_contended, &|_, _, _| drop(map[&hot].write())),
    );

    // Each thread on its own half of the keys.
    let split = |t: usize, i: u64| key(2 * (i % (NR_KEYS / 2)) + t as u64);
    compare(
        "prison_exclusive_disjoint_2t",
        2 * nr_contended,
        || {
            round_two_threads(nr_contended, &|t, i, w| {
                drop(block_on(prison.exclusive(split(t, i), Level::ReadWrite), w));
            })
        },
        || round_two_threads(nr_contended, &|t, i, _| drop(map[&split(t, i)].write())),
    );

    // Every lock on a key not locked before in this benchmark: no idle cell to reuse.
    let nr_distinct = nr_iters.min(1 << 20);
    let distinct: Vec<Key> = (0..nr_distinct)
        .map(|v| Key::virt(100 + (v % 4) as u32, v * 7))
        .collect();
    let distinct_map = baseline_map(&distinct);
    let fresh = |round: u64, i: u64| {
        let key = distinct[(i % nr_distinct) as usize];
        // Each round uses other thins, so that no round finds the last one's idle cells.
        match key {
            Key::Virtual(thin, vblock) => {
                Key::Virtual(bio_prison::ThinId(thin.0 + 8 * round as u32), vblock)
            }
            key => key,
        }
    };
    let mut nr_round = 0;
    let ours = median(
        (0..NR_ROUNDS)
            .map(|_| {
                nr_round += 1;
                round(nr_distinct, &mut |i| {
                    drop(now(prison.exclusive(fresh(nr_round, i), Level::ReadWrite)))
                })
            })
            .collect(),
    )
    .as_nanos() as f64
        / nr_distinct as f64;
    let base = median(
        (0..NR_ROUNDS)
            .map(|_| {
                round(nr_distinct, &mut |i| {
                    drop(distinct_map[&distinct[(i % nr_distinct) as usize]].write())
                })
            })
            .collect(),
    )
    .as_nanos() as f64
        / nr_distinct as f64;
    // FIGUREs only: the goal is for the recurring keys above; this shows what a lock costs
    // when there is nothing to reuse.
    figure("prison_exclusive_distinct_keys_ns", ours, "ns");
    figure("prison_exclusive_distinct_keys_rwlock_map_ns", base, "ns");

    assert_eq!(prison.nr_cells(), 0, "the benchmark leaked locks");
}
