//! Test helpers: poll a future by hand and see whether it was woken.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// A waker that records that it was woken.
#[derive(Debug, Default)]
pub struct Flag {
    woken: AtomicBool,
    nr_wakes: AtomicUsize,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.nr_wakes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A future polled by hand, with its own waker.
pub struct Probe<F: Future> {
    fut: Option<Pin<Box<F>>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future> Probe<F> {
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        Probe {
            fut: Some(Box::pin(fut)),
            flag,
            waker,
        }
    }

    /// Polls once; `Some(output)` when ready (the future is then gone).
    pub fn poll(&mut self) -> Option<F::Output> {
        self.flag.woken.store(false, Ordering::SeqCst);
        let mut cx = Context::from_waker(&self.waker);
        let fut = self.fut.as_mut().expect("probe polled after completion");
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => {
                self.fut = None;
                Some(out)
            }
            Poll::Pending => None,
        }
    }

    /// Polls and insists on completion.
    #[track_caller]
    pub fn ready(&mut self) -> F::Output {
        self.poll().expect("expected the future to complete")
    }

    /// Polls and insists it is still pending.
    #[track_caller]
    pub fn pending(&mut self) {
        assert!(self.poll().is_none(), "expected the future to be pending");
    }

    /// Whether the waker was woken since the last poll.
    pub fn woken(&self) -> bool {
        self.flag.woken.load(Ordering::SeqCst)
    }
}

/// Polls `fut` once with a no-op waker.
pub fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(Waker::noop()))
}

/// Runs `fut`, which must never have to wait, to completion.
#[track_caller]
pub fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("expected the future to complete at once"),
    }
}

/// The seed for a randomized test: `PRISON_SEED` if set, else one from the clock (a fixed one
/// under miri, whose isolation hides the clock).
pub fn seed() -> u64 {
    match std::env::var("PRISON_SEED") {
        Ok(s) => s.trim().parse().expect("PRISON_SEED must be a u64"),
        Err(_) if cfg!(miri) => 0x5eed,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Prints the seed if the test panics while this is alive.
pub struct SeedReporter(pub u64, pub &'static str);

impl Drop for SeedReporter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}: replay with PRISON_SEED={} PRISON_MODEL_SEEDS=1",
                self.1, self.0, self.0
            );
        }
    }
}

/// splitmix64: small, seedable, good enough to pick operations.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
