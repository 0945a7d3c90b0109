//! bio-prison: the cost of a lock on the I/O path, beside the obvious alternative, a
//! `HashMap` of `parking_lot::RwLock`s (pre-populated, so it needs no lock of its own; it has
//! no levels, no upgrade, no range locks, no fairness between readers and writers).
//!
//! Figures, each the median of several rounds, in ns per acquire+release:
//! - uncontended shared and exclusive: one thread cycling through 1024 keys, futures polled
//!   once with a no-op waker (they never wait);
//! - two threads contending for one key (shared, then exclusive): wall time over all
//!   operations of both threads; waiting futures park the thread and are woken by unpark;
//! - two threads on disjoint keys: what sharding buys;
//! - uncontended exclusive on ever new keys (`prison_exclusive_distinct_keys`): every lock
//!   is of a key never locked before, so the prison's idle cells cannot help and each lock
//!   creates a cell (and evicts an idle one); the baseline map is pre-filled with all those
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
const NR_ROUNDS: usize = 5;

/// Polls once with a no-op waker: for futures that must not wait.
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

/// Runs `fut` on this thread, parking while it waits.
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

/// ns per iteration of `op`, median over rounds.
fn per_op(nr_iters: u64, mut op: impl FnMut(u64)) -> f64 {
    let rounds: Vec<Duration> = (0..NR_ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for i in 0..nr_iters {
                op(i);
            }
            start.elapsed()
        })
        .collect();
    median(rounds).as_nanos() as f64 / nr_iters as f64
}

/// ns per operation over both threads, median over rounds; `op(thread, i)`.
fn per_op_two_threads(nr_iters: u64, op: impl Fn(usize, u64, &Waker) + Sync) -> f64 {
    let rounds: Vec<Duration> = (0..NR_ROUNDS)
        .map(|_| {
            let barrier = Barrier::new(2);
            let start = Instant::now();
            thread::scope(|s| {
                for t in 0..2 {
                    let (barrier, op) = (&barrier, &op);
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
        })
        .collect();
    median(rounds).as_nanos() as f64 / (2 * nr_iters) as f64
}

fn report(name: &str, ours: f64, baseline: f64) {
    figure(&format!("{name}_ns"), ours, "ns");
    figure(&format!("{name}_rwlock_map_ns"), baseline, "ns");
    ratio(name, baseline / ours, 1.0);
}

fn main() {
    let opts = Options::from_args();
    let nr_iters: u64 = if opts.quick { 20_000 } else { 2_000_000 };
    let nr_contended: u64 = if opts.quick { 5_000 } else { 300_000 };
    let keys = keys();
    let map = baseline_map(&keys);
    let prison = Prison::new();
    let key = |i: u64| keys[(i % NR_KEYS) as usize];

    let ours = per_op(nr_iters, |i| drop(now(prison.shared(key(i), Access::Read))));
    let base = per_op(nr_iters, |i| drop(map[&key(i)].read()));
    report("prison_shared_uncontended", ours, base);

    let ours = per_op(nr_iters, |i| {
        drop(now(prison.exclusive(key(i), Level::ReadWrite)))
    });
    let base = per_op(nr_iters, |i| drop(map[&key(i)].write()));
    report("prison_exclusive_uncontended", ours, base);

    let hot = key(0);
    let ours = per_op_two_threads(nr_contended, |_, _, w| {
        drop(block_on(prison.shared(hot, Access::Read), w));
    });
    let base = per_op_two_threads(nr_contended, |_, _, _| drop(map[&hot].read()));
    report("prison_shared_contended_2t", ours, base);

    let ours = per_op_two_threads(nr_contended, |_, _, w| {
        drop(block_on(prison.exclusive(hot, Level::ReadWrite), w));
    });
    let base = per_op_two_threads(nr_contended, |_, _, _| drop(map[&hot].write()));
    report("prison_exclusive_contended_2t", ours, base);

    // Each thread on its own half of the keys.
    let split = |t: usize, i: u64| key(2 * (i % (NR_KEYS / 2)) + t as u64);
    let ours = per_op_two_threads(nr_contended, |t, i, w| {
        drop(block_on(prison.exclusive(split(t, i), Level::ReadWrite), w));
    });
    let base = per_op_two_threads(nr_contended, |t, i, _| drop(map[&split(t, i)].write()));
    report("prison_exclusive_disjoint_2t", ours, base);

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
    let mut round = 0;
    let ours = per_op(nr_distinct, |i| {
        if i == 0 {
            round += 1;
        }
        drop(now(prison.exclusive(fresh(round, i), Level::ReadWrite)))
    });
    let base = per_op(nr_distinct, |i| {
        drop(distinct_map[&distinct[(i % nr_distinct) as usize]].write())
    });
    // FIGUREs only: the goal is for the recurring keys above; this shows what a lock costs
    // when there is nothing to reuse.
    figure("prison_exclusive_distinct_keys_ns", ours, "ns");
    figure("prison_exclusive_distinct_keys_rwlock_map_ns", base, "ns");

    assert_eq!(prison.nr_cells(), 0, "the benchmark leaked locks");
}
