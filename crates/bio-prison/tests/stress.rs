//! Multi-threaded stress test: several queue-like threads, each running many tasks on its own
//! `LocalExecutor` (as libublk does), hammer a few keys with every kind of lock, upgrade,
//! promote, downgrade, quiesce ranges and thins, and cancel waits half-way.
//!
//! Every holder records itself in per-key counters right after being granted and checks that
//! nothing it conflicts with is recorded: never two exclusive holders, never a shared holder
//! beside an exclusive one at a level that blocks it. A watchdog fails the test if no lock is
//! granted for `STALL` while tasks still wait (a lost wake-up or a deadlock).
//!
//! Seeded (`PRISON_SEED`) for the choice of operations; thread interleaving is not replayable,
//! so a failure prints the seed and the prison's state. `PRISON_STRESS_OPS` scales the run.
#![cfg(not(loom))] // loom's mutex only works inside loom::model: see tests/loom.rs

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_executor::LocalExecutor;
use bio_prison::{Access, Key, Level, Prison, ThinId, VBlock};
use common::{Rng, SeedReporter};
use futures_lite::future;

const NR_THINS: u32 = 2;
const NR_VBLOCKS: u64 = 6;
const NR_DBLOCKS: u64 = 4;
const STALL: Duration = Duration::from_secs(20);

/// Mode indices for the counters: ShR, ShW, Upg, ExW, ExRW.
const SHR: usize = 0;
const SHW: usize = 1;
const UPG: usize = 2;
const EXW: usize = 3;
const EXRW: usize = 4;

fn conflicts(a: usize, b: usize) -> bool {
    match (a.min(b), a.max(b)) {
        (SHR, EXRW) => true,
        (SHR, _) => false,
        (SHW, SHW) | (SHW, UPG) => false,
        _ => true,
    }
}

fn sh(access: Access) -> usize {
    match access {
        Access::Read => SHR,
        Access::Write => SHW,
    }
}

fn ex(level: Level) -> usize {
    match level {
        Level::Write => EXW,
        Level::ReadWrite => EXRW,
    }
}

/// Who holds each key, as the holders themselves report it.
struct Ledger {
    counts: Vec<[AtomicU32; 5]>,
    grants: AtomicU64,
}

impl Ledger {
    fn new() -> Ledger {
        let nr = (NR_THINS as u64 * NR_VBLOCKS + NR_DBLOCKS) as usize;
        Ledger {
            counts: (0..nr).map(|_| Default::default()).collect(),
            grants: AtomicU64::new(0),
        }
    }

    fn slot(key: Key) -> usize {
        match key {
            Key::Virtual(thin, vblock) => (thin.0 as u64 * NR_VBLOCKS + vblock.0) as usize,
            Key::Data(dblock) => (NR_THINS as u64 * NR_VBLOCKS + dblock.0) as usize,
        }
    }

    /// Records a holder of `key` in `mode` and checks it is compatible with all others.
    fn enter(&self, key: Key, mode: usize) {
        self.grants.fetch_add(1, SeqCst);
        let counts = &self.counts[Self::slot(key)];
        counts[mode].fetch_add(1, SeqCst);
        for (other, count) in counts.iter().enumerate() {
            let n = count.load(SeqCst) - u32::from(other == mode);
            assert!(
                n == 0 || !conflicts(mode, other),
                "{key}: granted mode {mode} while {n} holder(s) of mode {other} hold it"
            );
        }
    }

    fn leave(&self, key: Key, mode: usize) {
        let old = self.counts[Self::slot(key)][mode].fetch_sub(1, SeqCst);
        assert!(old > 0, "{key}: leaving mode {mode} that was not entered");
    }

    /// A holder's mode changes in place (upgrade, promote, downgrade).
    fn change(&self, key: Key, from: usize, to: usize) {
        self.leave(key, from);
        self.enter(key, to);
    }

    fn assert_empty(&self) {
        for (slot, counts) in self.counts.iter().enumerate() {
            for (mode, n) in counts.iter().enumerate() {
                assert_eq!(n.load(SeqCst), 0, "slot {slot} mode {mode} still held");
            }
        }
    }
}

fn random_key(rng: &mut Rng) -> Key {
    if rng.chance(20) {
        Key::data(rng.below(NR_DBLOCKS))
    } else {
        Key::virt(rng.below(NR_THINS.into()) as u32, rng.below(NR_VBLOCKS))
    }
}

fn random_level(rng: &mut Rng) -> Level {
    if rng.chance(50) {
        Level::Write
    } else {
        Level::ReadWrite
    }
}

fn random_access(rng: &mut Rng) -> Access {
    if rng.chance(60) {
        Access::Read
    } else {
        Access::Write
    }
}

async fn pause(rng: &mut Rng) {
    for _ in 0..rng.below(4) {
        future::yield_now().await;
    }
}

/// Waits for a conversion, or sometimes gives up after a few polls: `leave` runs before the
/// drop releases the lock, so the ledger never shows us gone while we still hold.
async fn convert_or_cancel<'a>(
    rng: &mut Rng,
    mut conv: bio_prison::Convert<'a>,
    leave: impl FnOnce(),
) -> Option<bio_prison::ExclusiveGuard<'a>> {
    if !rng.chance(10) {
        return Some(conv.await);
    }
    for _ in 0..rng.below(3) {
        if let Some(g) = future::poll_once(&mut conv).await {
            return Some(g);
        }
        future::yield_now().await;
    }
    leave();
    drop(conv);
    None
}

/// Runs an acquisition unless a few yields pass first, in which case it is dropped
/// (cancelled). Only for acquisitions: the ledger has no entry to withdraw.
async fn maybe_cancel<F: std::future::Future>(rng: &mut Rng, fut: F) -> Option<F::Output> {
    if !rng.chance(10) {
        return Some(fut.await);
    }
    let nr_yields = rng.below(3);
    future::or(async { Some(fut.await) }, async {
        for _ in 0..nr_yields {
            future::yield_now().await;
        }
        None
    })
    .await
}

/// One task: `nr_ops` random lock lifetimes.
async fn task(prison: &Prison, ledger: &Ledger, mut rng: Rng, nr_ops: u64) {
    for _ in 0..nr_ops {
        match rng.below(100) {
            0..45 => {
                // An I/O request: shared for its life, sometimes upgrading to provision.
                let key = random_key(&mut rng);
                let access = random_access(&mut rng);
                let Some(g) = maybe_cancel(&mut rng, prison.shared(key, access)).await else {
                    continue;
                };
                ledger.enter(key, sh(access));
                pause(&mut rng).await;
                if access == Access::Write && rng.chance(30) {
                    let level = random_level(&mut rng);
                    match g.try_upgradable() {
                        Ok(u) => {
                            ledger.change(key, SHW, UPG);
                            let leave = || ledger.leave(key, UPG);
                            let Some(e) =
                                convert_or_cancel(&mut rng, u.upgrade(level), leave).await
                            else {
                                continue;
                            };
                            ledger.change(key, UPG, ex(level));
                            pause(&mut rng).await;
                            // Record a downgrade before making it, so the ledger never
                            // shows us stronger than we hold.
                            ledger.change(key, ex(level), SHW);
                            let s = e.downgrade(Access::Write);
                            pause(&mut rng).await;
                            ledger.leave(key, SHW);
                            drop(s);
                        }
                        Err(g) => {
                            ledger.leave(key, SHW);
                            drop(g);
                        }
                    }
                } else {
                    ledger.leave(key, sh(access));
                    drop(g);
                }
            }
            45..60 => {
                // Break sharing: upgradable, exclusive at write level, copy, promote.
                let key = random_key(&mut rng);
                let Some(u) = maybe_cancel(&mut rng, prison.upgradable(key)).await else {
                    continue;
                };
                ledger.enter(key, UPG);
                pause(&mut rng).await;
                let leave = || ledger.leave(key, UPG);
                let Some(e) = convert_or_cancel(&mut rng, u.upgrade(Level::Write), leave).await
                else {
                    continue;
                };
                ledger.change(key, UPG, EXW);
                pause(&mut rng).await;
                let leave = || ledger.leave(key, EXW);
                let Some(e) = convert_or_cancel(&mut rng, e.promote(Level::ReadWrite), leave).await
                else {
                    continue;
                };
                ledger.change(key, EXW, EXRW);
                pause(&mut rng).await;
                ledger.leave(key, EXRW);
                drop(e);
            }
            60..85 => {
                let key = random_key(&mut rng);
                let level = random_level(&mut rng);
                let Some(e) = maybe_cancel(&mut rng, prison.exclusive(key, level)).await else {
                    continue;
                };
                ledger.enter(key, ex(level));
                pause(&mut rng).await;
                ledger.leave(key, ex(level));
                drop(e);
            }
            _ => {
                // Quiesce a range (discard) or a whole thin (snapshot, delete).
                let thin = rng.below(NR_THINS.into()) as u32;
                let level = random_level(&mut rng);
                let (first, last) = if rng.chance(30) {
                    (0, NR_VBLOCKS - 1)
                } else {
                    let first = rng.below(NR_VBLOCKS);
                    (first, first + rng.below(NR_VBLOCKS - first))
                };
                let fut = if first == 0 && last == NR_VBLOCKS - 1 && rng.chance(50) {
                    prison.exclusive_thin(ThinId(thin), level)
                } else {
                    prison.exclusive_range(ThinId(thin), VBlock(first)..VBlock(last + 1), level)
                };
                let Some(f) = maybe_cancel(&mut rng, fut).await else {
                    continue;
                };
                for v in first..=last {
                    ledger.enter(Key::virt(thin, v), ex(level));
                }
                pause(&mut rng).await;
                for v in first..=last {
                    ledger.leave(Key::virt(thin, v), ex(level));
                }
                drop(f);
            }
        }
    }
}

#[test]
fn many_threads_many_tasks_no_conflict_no_stall() {
    let seed = common::seed();
    let _report = SeedReporter(seed, "many_threads_many_tasks_no_conflict_no_stall");
    let nr_ops: u64 = std::env::var("PRISON_STRESS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(miri) { 8 } else { 3000 });
    let (nr_threads, nr_tasks) = if cfg!(miri) { (2, 3) } else { (3, 8) };
    // Shared by `Arc` and threads left unjoined until they finish, so that threads stuck by a
    // bug can be left behind: the watchdog must fail the test instead of hanging in a join.
    // Idle-cell bound from the seed: none, few (evictions all the time), or the default.
    let idle_cells = [0, 2, bio_prison::DEFAULT_IDLE_CELLS_PER_SHARD][(seed % 3) as usize];
    let prison = Arc::new(Prison::with_shards_and_idle_cells(4, idle_cells));
    let ledger = Arc::new(Ledger::new());
    let nr_done = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = (0..nr_threads)
        .map(|t| {
            let (prison, ledger, nr_done) = (prison.clone(), ledger.clone(), nr_done.clone());
            std::thread::spawn(move || {
                let exe = LocalExecutor::new();
                let tasks: Vec<_> = (0..nr_tasks)
                    .map(|i| {
                        let rng = Rng(seed ^ ((t * 1000 + i) as u64).wrapping_mul(0x9e37_79b9));
                        exe.spawn(task(&prison, &ledger, rng, nr_ops))
                    })
                    .collect();
                future::block_on(exe.run(async {
                    for t in tasks {
                        t.await;
                    }
                }));
                nr_done.fetch_add(1, SeqCst);
            })
        })
        .collect();
    // Watchdog: grants must keep coming while threads still run.
    let (mut last, mut since) = (0, Instant::now());
    while nr_done.load(SeqCst) < nr_threads && threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = ledger.grants.load(SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > STALL {
            prison.check_invariants();
            panic!("no lock granted for {STALL:?}: lost wake-up or deadlock; {prison:?}");
        }
    }
    for t in threads {
        if let Err(panic) = t.join() {
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("seed {seed}: {} grants", ledger.grants.load(SeqCst));
    prison.check_invariants();
    ledger.assert_empty();
    assert_eq!(prison.nr_cells(), 0, "cells left after every task finished");
}
