//! The futures that wait for a lock. They work on any executor: they only use the `Waker`
//! they are polled with, and never block the thread beyond a shard's short critical section.
//!
//! Invariants:
//! - Nothing happens until the first poll, and the first poll of an uncontended request
//!   completes it: one shard lock, no allocation beyond the cell.
//! - The waker of the latest poll is the one woken (a task may move between executors).
//! - Dropping a future at any point before it returns `Ready` releases everything it was
//!   granted (even if the grant arrived after its last poll) and dequeues it, waking whoever
//!   it was holding back. Polling after `Ready` panics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::core::{Acquired, WaiterId};
use crate::fence::{FencePart, FenceShared};
use crate::guard::{At, ExclusiveGuard, FenceGuard, Held, SharedGuard, UpgradableGuard};
use crate::key::{Hashed, Key, Level, Mode, ThinId};
use crate::slots::Fast;
use crate::sync::Arc;
use crate::Prison;

/// Waiting for a single-block lock in some mode; the typed futures below wrap it.
#[derive(Debug)]
pub(crate) struct Acquire<'a> {
    prison: &'a Prison,
    shard: u32,
    key: Hashed,
    mode: Mode,
    state: AcquireState,
}

#[derive(Debug, Clone, Copy)]
enum AcquireState {
    Start,
    Queued(WaiterId),
    Done,
}

impl<'a> Acquire<'a> {
    #[inline]
    pub(crate) fn new(prison: &'a Prison, key: Key, mode: Mode) -> Self {
        let key = Hashed::new(key);
        Acquire {
            prison,
            shard: prison.shard_of(key),
            key,
            mode,
            state: AcquireState::Start,
        }
    }

    #[inline(always)]
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Held<'a>> {
        let prison = self.prison;
        let at = match self.state {
            AcquireState::Start => {
                match prison.slots(self.shard).try_acquire(self.key, self.mode) {
                    Some((id, slot)) => Some(At::Slot(id, slot)),
                    None => self.start_slow(cx),
                }
            }
            AcquireState::Queued(w) => self.poll_queued(w, cx),
            AcquireState::Done => polled_after_ready(),
        };
        match at {
            Some(at) => {
                self.state = AcquireState::Done;
                Poll::Ready(Held {
                    prison,
                    shard: self.shard,
                    at,
                    key: self.key.key,
                    mode: self.mode,
                })
            }
            None => Poll::Pending,
        }
    }

    /// Dropped while queued: leave the queue, or give back what was granted meanwhile.
    #[inline(never)]
    fn cancel(&mut self, w: WaiterId) {
        self.prison.with_core(self.shard, |c| c.cancel_waiter(w));
    }

    /// A later poll of a queued request.
    #[inline(never)]
    fn poll_queued(&mut self, w: WaiterId, cx: &mut Context<'_>) -> Option<At<'a>> {
        self.prison
            .with_core(self.shard, |c| c.poll_waiter(w, cx.waker()))
            .map(At::Cell)
    }

    /// The first poll, when the fast path did not grant: the shard's core decides.
    #[inline(never)]
    fn start_slow(&mut self, cx: &mut Context<'_>) -> Option<At<'a>> {
        let (key, mode) = (self.key, self.mode);
        match self
            .prison
            .with_core(self.shard, |c| c.acquire(key, mode, Some(cx.waker())))
        {
            Acquired::Granted(loc) => {
                Some(Held::new(self.prison, self.shard, loc, key.key, mode).at)
            }
            Acquired::Queued(w) => {
                self.state = AcquireState::Queued(w);
                None
            }
            Acquired::Refused => unreachable!("refused although a waker was given"),
        }
    }
}

#[cold]
#[inline(never)]
fn polled_after_ready() -> ! {
    panic!("lock future polled after it completed")
}

impl Drop for Acquire<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if let AcquireState::Queued(w) = self.state {
            self.cancel(w);
        }
    }
}

/// Future of [`Prison::shared`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct SharedFuture<'a>(pub(crate) Acquire<'a>);

/// Future of [`Prison::upgradable`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct UpgradableFuture<'a>(pub(crate) Acquire<'a>);

/// Future of [`Prison::exclusive`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct ExclusiveFuture<'a>(pub(crate) Acquire<'a>);

impl<'a> Future for SharedFuture<'a> {
    type Output = SharedGuard<'a>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_held(cx).map(SharedGuard::from_held)
    }
}

impl<'a> Future for UpgradableFuture<'a> {
    type Output = UpgradableGuard<'a>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_held(cx).map(UpgradableGuard::from_held)
    }
}

impl<'a> Future for ExclusiveFuture<'a> {
    type Output = ExclusiveGuard<'a>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll_held(cx).map(ExclusiveGuard::from_held)
    }
}

/// Future of an upgrade or a promotion: owns the lock being converted, and releases it
/// entirely if dropped before completing.
#[derive(Debug)]
#[must_use = "futures do nothing unless polled; dropping this one releases the lock"]
pub struct Convert<'a> {
    held: Held<'a>,
    target: Level,
    state: ConvertState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvertState {
    Start,
    Waiting,
    Done,
}

impl<'a> Convert<'a> {
    pub(crate) fn new(held: Held<'a>, target: Level) -> Self {
        Convert {
            held,
            target,
            state: ConvertState::Start,
        }
    }
}

impl<'a> Future for Convert<'a> {
    type Output = ExclusiveGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (held, target) = (self.held, self.target);
        let done = match (self.state, held.at) {
            (ConvertState::Start, At::Slot(id, slot)) => {
                match slot.try_convert(held.mode, target) {
                    Fast::Done => true,
                    // It must wait, or the core has the key: the core decides, and accounts
                    // for this holder from now on.
                    Fast::NotNow | Fast::Sealed => {
                        let (cell, done) = held.prison.with_core(held.shard, |c| {
                            let cell = c.adopt(id, held.key, held.mode);
                            (cell, c.begin_conversion(cell, target, cx.waker()))
                        });
                        self.held = held.in_cell(cell);
                        done
                    }
                }
            }
            (ConvertState::Start, At::Cell(cell)) => held
                .prison
                .with_core(held.shard, |c| c.begin_conversion(cell, target, cx.waker())),
            (ConvertState::Waiting, At::Cell(cell)) => held
                .prison
                .with_core(held.shard, |c| c.poll_conversion(cell, cx.waker())),
            (ConvertState::Waiting, At::Slot(..)) => unreachable!("waiting conversion on a slot"),
            (ConvertState::Done, _) => panic!("conversion future polled after it completed"),
        };
        if done {
            self.state = ConvertState::Done;
            let held = self.held;
            Poll::Ready(ExclusiveGuard::from_held(held.now(Mode::Exclusive(target))))
        } else {
            self.state = ConvertState::Waiting;
            Poll::Pending
        }
    }
}

impl Drop for Convert<'_> {
    fn drop(&mut self) {
        let held = self.held;
        match (self.state, held.at) {
            (ConvertState::Start, _) => held.release(),
            (ConvertState::Waiting, At::Cell(cell)) => {
                held.prison
                    .with_core(held.shard, |c| c.cancel_conversion(cell));
            }
            (ConvertState::Waiting, At::Slot(..)) => unreachable!("waiting conversion on a slot"),
            (ConvertState::Done, _) => {}
        }
    }
}

/// Future of [`Prison::exclusive_range`] and [`Prison::exclusive_thin`].
#[must_use = "futures do nothing unless polled"]
pub struct FenceFuture<'a> {
    guard: Option<FenceGuard<'a>>,
}

impl std::fmt::Debug for FenceFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceFuture")
            .field("guard", &self.guard)
            .finish()
    }
}

impl<'a> FenceFuture<'a> {
    pub(crate) fn new(
        prison: &'a Prison,
        thin: ThinId,
        blocks: Option<(u64, u64)>,
        level: Level,
    ) -> Self {
        FenceFuture {
            guard: Some(FenceGuard {
                prison,
                registered: None,
                thin,
                blocks,
                level,
            }),
        }
    }
}

impl<'a> Future for FenceFuture<'a> {
    type Output = FenceGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let guard = self
            .guard
            .as_mut()
            .expect("fence future polled after it completed");
        let Some((first, last)) = guard.blocks else {
            return Poll::Ready(self.guard.take().expect("guard"));
        };
        let shared = match &guard.registered {
            Some((_, shared)) => shared.clone(),
            None => {
                let (id, shared) =
                    guard
                        .prison
                        .register_fence(guard.thin, first, last, guard.level);
                guard.registered = Some((id, shared.clone()));
                shared
            }
        };
        if shared.poll(cx.waker()) {
            Poll::Ready(self.guard.take().expect("guard"))
        } else {
            Poll::Pending
        }
    }
}

impl Prison {
    /// Registers a fence's part in every shard, in the same order as every other fence.
    fn register_fence(
        &self,
        thin: ThinId,
        first: u64,
        last: u64,
        level: Level,
    ) -> (u64, Arc<FenceShared>) {
        let shared = Arc::new(FenceShared::new(self.shards.len()));
        let mut next_id = self.fence_registry.lock();
        let id = *next_id;
        *next_id += 1;
        for shard in 0..self.shards.len() as u32 {
            let part = FencePart {
                id,
                seq: 0,
                thin,
                first,
                last,
                level,
                granted: false,
                shared: shared.clone(),
            };
            self.with_core(shard, |c| c.add_fence(part));
        }
        drop(next_id);
        (id, shared)
    }

    /// Removes fence `id` from every shard (granted or not), letting through what it held.
    pub(crate) fn unregister_fence(&self, id: u64) {
        for shard in 0..self.shards.len() as u32 {
            self.with_core(shard, |c| c.remove_fence(id));
        }
    }
}
