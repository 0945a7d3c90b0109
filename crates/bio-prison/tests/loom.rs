//! Model checking with loom: every interleaving (up to the preemption bound) of a few threads
//! running the real prison, whose mutexes and `Arc` become loom's under `--cfg loom`.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p bio-prison --release
//! --test loom`. Loom fails a test on a deadlock (every thread parked: a lost wake-up), on
//! an assertion in any interleaving, and on a leaked `Arc`.
#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bio_prison::{Access, Key, Level, Prison, ThinId};
use loom::future::block_on;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;

/// Polls the inner future once and reports whether it completed (dropping it either way).
struct PollOnce<F>(Option<F>);

impl<F: Future + Unpin> Future for PollOnce<F> {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut inner = self.0.take().expect("polled once");
        Poll::Ready(Pin::new(&mut inner).poll(cx).is_ready())
    }
}

struct Shared {
    prison: Prison,
    exclusive: AtomicUsize,
    /// Exclusive holders at `Level::ReadWrite`, which readers must never see.
    exclusive_rw: AtomicUsize,
    readers: AtomicUsize,
    writers: AtomicUsize,
}

/// Slots per shard in the models: one bucket, so the lock-free table is small enough to
/// model, and full enough that keys compete for it.
const NR_SLOTS: usize = 4;

fn setup(nr_shards: usize) -> Arc<Shared> {
    Arc::new(Shared {
        prison: Prison::with_shards_and_idle_cells(nr_shards, NR_SLOTS),
        exclusive: AtomicUsize::new(0),
        exclusive_rw: AtomicUsize::new(0),
        readers: AtomicUsize::new(0),
        writers: AtomicUsize::new(0),
    })
}

impl Shared {
    fn enter_exclusive(&self, readers_allowed: bool) {
        assert_eq!(
            self.exclusive.fetch_add(1, SeqCst),
            0,
            "two exclusive holders"
        );
        assert_eq!(self.writers.load(SeqCst), 0, "exclusive beside a writer");
        if !readers_allowed {
            self.exclusive_rw.fetch_add(1, SeqCst);
            assert_eq!(
                self.readers.load(SeqCst),
                0,
                "read-write exclusive beside a reader"
            );
        }
    }

    fn leave_exclusive(&self, readers_allowed: bool) {
        if !readers_allowed {
            self.exclusive_rw.fetch_sub(1, SeqCst);
        }
        self.exclusive.fetch_sub(1, SeqCst);
    }

    fn finish(&self) {
        self.prison.check_invariants();
        assert_eq!(self.prison.nr_cells(), 0);
    }
}

const K: Key = Key::Virtual(ThinId(1), bio_prison::VBlock(0));

#[test]
fn exclusive_locks_exclude_each_other() {
    loom::model(|| {
        let s = setup(1);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    block_on(async {
                        let g = s.prison.exclusive(K, Level::ReadWrite).await;
                        s.enter_exclusive(false);
                        s.leave_exclusive(false);
                        drop(g);
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        s.finish();
    });
}

#[test]
fn upgrade_waits_for_shared_holders_to_drain() {
    loom::model(|| {
        let s = setup(1);
        let s1 = s.clone();
        let writer = thread::spawn(move || {
            block_on(async {
                let g = s1.prison.shared(K, Access::Write).await;
                s1.writers.fetch_add(1, SeqCst);
                assert_eq!(s1.exclusive.load(SeqCst), 0, "writer beside exclusive");
                s1.writers.fetch_sub(1, SeqCst);
                drop(g);
            })
        });
        block_on(async {
            let u = s.prison.upgradable(K).await;
            let e = u.upgrade(Level::ReadWrite).await;
            s.enter_exclusive(false);
            s.leave_exclusive(false);
            drop(e);
        });
        writer.join().unwrap();
        s.finish();
    });
}

#[test]
fn promotion_drains_readers_that_a_write_level_lock_let_in() {
    loom::model(|| {
        let s = setup(1);
        let s1 = s.clone();
        let reader = thread::spawn(move || {
            block_on(async {
                let g = s1.prison.shared(K, Access::Read).await;
                s1.readers.fetch_add(1, SeqCst);
                // A write-level holder may be beside us; a read-write one may not.
                assert_eq!(
                    s1.exclusive_rw.load(SeqCst),
                    0,
                    "reader beside read-write lock"
                );
                s1.readers.fetch_sub(1, SeqCst);
                drop(g);
            })
        });
        block_on(async {
            let e = s.prison.exclusive(K, Level::Write).await;
            s.enter_exclusive(true);
            s.leave_exclusive(true);
            let e = e.promote(Level::ReadWrite).await;
            s.enter_exclusive(false);
            s.leave_exclusive(false);
            drop(e);
        });
        reader.join().unwrap();
        s.finish();
    });
}

#[test]
fn dropping_a_queued_or_granted_future_wakes_the_next() {
    loom::model(|| {
        let s = setup(1);
        let g = s.prison.try_exclusive(K, Level::ReadWrite).expect("free");
        let s1 = s.clone();
        let quitter = thread::spawn(move || {
            // Queues (or is granted, if the holder left first), then gives up.
            block_on(PollOnce(Some(s1.prison.exclusive(K, Level::ReadWrite))));
        });
        let s2 = s.clone();
        let patient = thread::spawn(move || {
            block_on(async {
                let r = s2.prison.shared(K, Access::Read).await;
                drop(r);
            })
        });
        drop(g);
        quitter.join().unwrap();
        patient.join().unwrap();
        s.finish();
    });
}

#[test]
fn thin_lock_waits_for_blocks_in_every_shard() {
    loom::model(|| {
        let s = setup(2);
        let threads: Vec<_> = (0..2u64)
            .map(|v| {
                let s = s.clone();
                thread::spawn(move || {
                    block_on(async {
                        let g = s.prison.shared(Key::virt(1, v), Access::Write).await;
                        s.writers.fetch_add(1, SeqCst);
                        assert_eq!(s.exclusive.load(SeqCst), 0, "writer inside a quiesce");
                        s.writers.fetch_sub(1, SeqCst);
                        drop(g);
                    })
                })
            })
            .collect();
        block_on(async {
            let f = s.prison.exclusive_thin(ThinId(1), Level::Write).await;
            s.enter_exclusive(true);
            s.leave_exclusive(true);
            drop(f);
        });
        for t in threads {
            t.join().unwrap();
        }
        s.finish();
    });
}

#[test]
fn cancelled_thin_lock_lets_blocks_through() {
    loom::model(|| {
        let s = setup(2);
        let held = s
            .prison
            .try_shared(Key::virt(1, 0), Access::Write)
            .expect("free");
        let s1 = s.clone();
        let quitter = thread::spawn(move || {
            block_on(PollOnce(Some(
                s1.prison.exclusive_thin(ThinId(1), Level::ReadWrite),
            )));
        });
        let s2 = s.clone();
        let writer = thread::spawn(move || {
            block_on(async {
                let g = s2.prison.shared(Key::virt(1, 1), Access::Write).await;
                drop(g);
            })
        });
        drop(held);
        quitter.join().unwrap();
        writer.join().unwrap();
        s.finish();
    });
}

/// Locks and unlocks `key`, leaving it idle in a slot (if its bucket had room).
fn leave_idle(s: &Shared, key: Key) {
    drop(s.prison.try_exclusive(key, Level::ReadWrite).expect("free"));
}

#[test]
fn a_slot_evicted_under_a_fast_acquire_never_mixes_keys() {
    loom::model(|| {
        let s = setup(1);
        // Fill the one bucket with idle keys, K among them.
        for v in 0..NR_SLOTS as u64 {
            leave_idle(&s, Key::virt(1, v));
        }
        let locker = |key: Key, counts: bool| {
            let s = s.clone();
            thread::spawn(move || {
                block_on(async {
                    let g = s.prison.exclusive(key, Level::ReadWrite).await;
                    if counts {
                        s.enter_exclusive(false);
                        s.leave_exclusive(false);
                    }
                    drop(g);
                })
            })
        };
        // A new key binds by evicting an idle one, maybe K's, while two threads lock K.
        let threads = [locker(K, true), locker(Key::virt(1, 99), false)];
        block_on(async {
            let g = s.prison.exclusive(K, Level::ReadWrite).await;
            s.enter_exclusive(false);
            s.leave_exclusive(false);
            drop(g);
        });
        for t in threads {
            t.join().unwrap();
        }
        s.finish();
    });
}

#[test]
fn a_downgrade_on_a_sealed_slot_lets_the_queue_in() {
    loom::model(|| {
        let s = setup(1);
        leave_idle(&s, K);
        let e = s.prison.try_exclusive(K, Level::ReadWrite).expect("free");
        let s1 = s.clone();
        let reader = thread::spawn(move || {
            block_on(async {
                let r = s1.prison.shared(K, Access::Read).await;
                s1.readers.fetch_add(1, SeqCst);
                assert_eq!(s1.exclusive_rw.load(SeqCst), 0, "reader beside read-write");
                s1.readers.fetch_sub(1, SeqCst);
                drop(r);
            })
        });
        s.enter_exclusive(false);
        s.leave_exclusive(false);
        // The reader may have queued (sealing the slot) or not yet: either way it gets in.
        let r = e.downgrade(Access::Read);
        drop(r);
        reader.join().unwrap();
        s.finish();
    });
}

#[test]
fn a_range_lock_takes_an_idle_slot_from_a_racing_writer() {
    loom::model(|| {
        let s = setup(1);
        leave_idle(&s, K);
        let s1 = s.clone();
        let writer = thread::spawn(move || {
            block_on(async {
                let g = s1.prison.shared(K, Access::Write).await;
                s1.writers.fetch_add(1, SeqCst);
                assert_eq!(s1.exclusive.load(SeqCst), 0, "writer inside a range lock");
                s1.writers.fetch_sub(1, SeqCst);
                drop(g);
            })
        });
        block_on(async {
            let f = s
                .prison
                .exclusive_range(
                    ThinId(1),
                    bio_prison::VBlock(0)..bio_prison::VBlock(4),
                    Level::Write,
                )
                .await;
            s.enter_exclusive(true);
            s.leave_exclusive(true);
            drop(f);
        });
        writer.join().unwrap();
        s.finish();
    });
}
