//! The futures work on any executor: a hand-rolled one that polls only woken tasks (so a lost
//! wake-up shows as tasks left with nothing to run), smol's `LocalExecutor` as libublk uses
//! it, and tokio's multi-threaded runtime, where tasks move between threads between polls.
#![cfg(not(loom))] // loom's mutex only works inside loom::model: see tests/loom.rs

mod common;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bio_prison::{Access, Key, Level, Prison, ThinId};

/// Counts holders of one key and fails if two exclusive ones overlap.
#[derive(Default)]
struct Exclusion(AtomicU32);

impl Exclusion {
    fn enter(&self) {
        assert_eq!(self.0.fetch_add(1, SeqCst), 0, "two exclusive holders");
    }

    fn leave(&self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Yields once to the executor.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

async fn worker(prison: &Prison, counters: &[Exclusion], id: u64, nr_ops: u64) {
    let mut rng = common::Rng(id);
    for _ in 0..nr_ops {
        let k = rng.below(counters.len() as u64);
        if rng.chance(10) {
            let fence = prison.exclusive_thin(ThinId(1), Level::ReadWrite).await;
            YieldNow(false).await;
            drop(fence);
        } else if rng.chance(50) {
            let shared = prison.shared(Key::virt(1, k), Access::Write).await;
            YieldNow(false).await;
            if let Ok(conv) = shared.upgrade(Level::ReadWrite) {
                let g = conv.await;
                counters[k as usize].enter();
                YieldNow(false).await;
                counters[k as usize].leave();
                drop(g);
            }
        } else {
            let g = prison.exclusive(Key::virt(1, k), Level::ReadWrite).await;
            counters[k as usize].enter();
            YieldNow(false).await;
            counters[k as usize].leave();
            drop(g);
        }
    }
}

/// A single-threaded executor that polls a task only after its waker fired.
struct Tiny<'a> {
    tasks: Vec<Option<Pin<Box<dyn Future<Output = ()> + 'a>>>>,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

struct TaskWaker {
    id: usize,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.lock().unwrap().push_back(self.id);
    }
}

impl<'a> Tiny<'a> {
    fn run(mut self) {
        let wakers: Vec<Waker> = (0..self.tasks.len())
            .map(|id| {
                Waker::from(Arc::new(TaskWaker {
                    id,
                    ready: self.ready.clone(),
                }))
            })
            .collect();
        self.ready.lock().unwrap().extend(0..self.tasks.len());
        loop {
            let next = self.ready.lock().unwrap().pop_front();
            let Some(id) = next else { break };
            let Some(task) = self.tasks[id].as_mut() else {
                continue;
            };
            if task
                .as_mut()
                .poll(&mut Context::from_waker(&wakers[id]))
                .is_ready()
            {
                self.tasks[id] = None;
            }
        }
        let stuck = self.tasks.iter().filter(|t| t.is_some()).count();
        assert_eq!(stuck, 0, "{stuck} tasks wait and nothing will wake them");
    }
}

#[test]
fn hand_rolled_executor_polls_only_woken_tasks() {
    let prison = Prison::with_shards(2);
    let counters: Vec<Exclusion> = (0..3).map(|_| Exclusion::default()).collect();
    let nr_ops = if cfg!(miri) { 5 } else { 300 };
    let tiny = Tiny {
        tasks: (0..12)
            .map(|id| {
                let fut: Pin<Box<dyn Future<Output = ()> + '_>> =
                    Box::pin(worker(&prison, &counters, id, nr_ops));
                Some(fut)
            })
            .collect(),
        ready: Arc::default(),
    };
    tiny.run();
    prison.check_invariants();
    assert_eq!(prison.nr_cells(), 0);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "smol's executor is slow under miri; the hand-rolled one covers it"
)]
fn smol_local_executor_per_queue_thread() {
    let prison = Prison::new();
    let counters: Vec<Exclusion> = (0..3).map(|_| Exclusion::default()).collect();
    std::thread::scope(|scope| {
        for q in 0..2u64 {
            let (prison, counters) = (&prison, &counters);
            scope.spawn(move || {
                let exe = async_executor::LocalExecutor::new();
                let tasks: Vec<_> = (0..8)
                    .map(|tag| exe.spawn(worker(prison, counters, q * 100 + tag, 200)))
                    .collect();
                futures_lite::future::block_on(exe.run(async {
                    for t in tasks {
                        t.await;
                    }
                }));
            });
        }
    });
    prison.check_invariants();
    assert_eq!(prison.nr_cells(), 0);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "tokio's runtime is slow under miri; the hand-rolled one covers it"
)]
fn tokio_multi_thread_runtime() {
    let prison = Arc::new(Prison::new());
    let counters: Arc<Vec<Exclusion>> = Arc::new((0..3).map(|_| Exclusion::default()).collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let handles: Vec<_> = (0..16)
            .map(|id| {
                let (prison, counters) = (prison.clone(), counters.clone());
                tokio::spawn(async move { worker(&prison, &counters, id, 200).await })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
    });
    prison.check_invariants();
    assert_eq!(prison.nr_cells(), 0);
}
