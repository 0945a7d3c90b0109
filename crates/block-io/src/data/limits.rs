//! Per-engine limits on in-flight I/O and buffer memory, with a FIFO queue for the excess.
//!
//! Every data operation takes a `Permit` for one I/O slot and the bytes of buffer memory it
//! pins before it allocates a bounce buffer or submits anything (seed 000 P8, P10, P11): a
//! request beyond the limits waits, in arrival order, instead of failing. A permit is released
//! when the I/O's completion arrives, not when its caller stops waiting: a permit travels with
//! the buffer into the ring's in-flight record when the future is dropped, so abandoned I/O
//! still counts against the limits until the kernel is done with it.
//!
//! Invariants: `nr_in_flight <= max_in_flight` and `nr_bytes <= max_in_flight_bytes` at all
//! times (a request larger than `max_in_flight_bytes` is charged exactly the whole budget, so
//! it runs alone rather than never); waiters are granted strictly in arrival order, so a large
//! request is never starved by small ones behind it; a waiter that gives up releases whatever it
//! was granted.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Limits of one engine. Both must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most operations submitted and not yet completed.
    pub max_in_flight: usize,
    /// Most bytes of buffer memory pinned by operations in flight (caller buffers and the
    /// engine's own bounce buffers for copies and zero-writing alike).
    pub max_in_flight_bytes: usize,
}

impl Default for Limits {
    /// 128 I/Os and 64 MiB: enough to keep an NVMe queue busy, small next to the memory of any
    /// machine that runs a pool.
    fn default() -> Self {
        Self {
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
        }
    }
}

impl Limits {
    pub(crate) fn validate(&self) -> io::Result<()> {
        if self.max_in_flight == 0 || self.max_in_flight_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("data I/O limits must be at least 1 I/O and 1 byte, got {self:?}"),
            ));
        }
        Ok(())
    }
}

/// Counters for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Operations holding a permit now.
    pub nr_in_flight: usize,
    /// Bytes charged to permits now.
    pub nr_in_flight_bytes: usize,
    /// The highest `nr_in_flight` seen.
    pub max_in_flight_seen: usize,
    /// The highest `nr_in_flight_bytes` seen.
    pub max_in_flight_bytes_seen: usize,
    /// Requests that had to queue.
    pub nr_waited: u64,
}

struct Waiter {
    id: u64,
    bytes: usize,
    granted: bool,
    waker: Option<Waker>,
}

struct State {
    stats: LimiterStats,
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

/// The shared counter behind the permits of one engine.
pub(crate) struct Limiter {
    limits: Limits,
    state: Mutex<State>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Limiter {
    pub(crate) fn new(limits: Limits) -> io::Result<Arc<Self>> {
        limits.validate()?;
        Ok(Arc::new(Self {
            limits,
            state: Mutex::new(State {
                stats: LimiterStats::default(),
                waiters: VecDeque::new(),
                next_id: 0,
            }),
        }))
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    pub(crate) fn stats(&self) -> LimiterStats {
        self.state.lock().stats
    }

    /// Waits (FIFO) for one I/O slot and `bytes` of buffer memory.
    pub(crate) fn acquire(self: &Arc<Self>, bytes: usize) -> Acquire {
        Acquire {
            limiter: Arc::clone(self),
            bytes: bytes.min(self.limits.max_in_flight_bytes),
            id: None,
        }
    }

    fn fits(&self, stats: &LimiterStats, bytes: usize) -> bool {
        stats.nr_in_flight < self.limits.max_in_flight
            && stats.nr_in_flight_bytes + bytes <= self.limits.max_in_flight_bytes
    }

    fn charge(stats: &mut LimiterStats, bytes: usize) {
        stats.nr_in_flight += 1;
        stats.nr_in_flight_bytes += bytes;
        stats.max_in_flight_seen = stats.max_in_flight_seen.max(stats.nr_in_flight);
        stats.max_in_flight_bytes_seen =
            stats.max_in_flight_bytes_seen.max(stats.nr_in_flight_bytes);
    }

    /// Returns one slot and `bytes`, then grants waiters in order while they fit. Wakers run
    /// after the lock is released: a waker may poll or drop other permits.
    fn release(&self, bytes: usize) {
        let mut to_wake = Vec::new();
        {
            let mut state = self.state.lock();
            let State { stats, waiters, .. } = &mut *state;
            assert!(
                stats.nr_in_flight >= 1 && stats.nr_in_flight_bytes >= bytes,
                "limiter released more than it granted"
            );
            stats.nr_in_flight -= 1;
            stats.nr_in_flight_bytes -= bytes;
            for waiter in waiters.iter_mut().filter(|w| !w.granted) {
                if !self.fits(stats, waiter.bytes) {
                    break; // strict FIFO: nobody overtakes the head
                }
                Self::charge(stats, waiter.bytes);
                waiter.granted = true;
                to_wake.extend(waiter.waker.take());
            }
        }
        for waker in to_wake {
            waker.wake();
        }
    }
}

/// The future of `Limiter::acquire`.
#[must_use = "a permit is only granted when the future is awaited"]
pub(crate) struct Acquire {
    limiter: Arc<Limiter>,
    bytes: usize,
    /// Set once queued.
    id: Option<u64>,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        let limiter = &this.limiter;
        let mut state = limiter.state.lock();
        let State {
            stats,
            waiters,
            next_id,
        } = &mut *state;
        match this.id {
            None => {
                if waiters.iter().all(|w| w.granted) && limiter.fits(stats, this.bytes) {
                    Limiter::charge(stats, this.bytes);
                    drop(state);
                    return Poll::Ready(this.permit());
                }
                let id = *next_id;
                *next_id += 1;
                stats.nr_waited += 1;
                waiters.push_back(Waiter {
                    id,
                    bytes: this.bytes,
                    granted: false,
                    waker: Some(cx.waker().clone()),
                });
                this.id = Some(id);
                Poll::Pending
            }
            Some(id) => {
                let Some(pos) = waiters.iter().position(|w| w.id == id) else {
                    // Unreachable: only this future removes its own entry.
                    panic!("limiter waiter {id} vanished");
                };
                if waiters[pos].granted {
                    waiters.remove(pos);
                    this.id = None;
                    drop(state);
                    return Poll::Ready(this.permit());
                }
                waiters[pos].waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Acquire {
    fn permit(&self) -> Permit {
        Permit {
            limiter: Arc::clone(&self.limiter),
            bytes: self.bytes,
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let mut state = self.limiter.state.lock();
        let Some(pos) = state.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        let waiter = state.waiters.remove(pos);
        drop(state);
        if waiter.is_some_and(|w| w.granted) {
            // Granted but never collected: give it back, which also wakes the next in line.
            self.limiter.release(self.bytes);
        }
    }
}

/// One I/O slot and some bytes of buffer memory; returned on drop.
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    bytes: usize,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn poll(fut: &mut Acquire, flag: &Arc<Flag>) -> Option<Permit> {
        let waker = Waker::from(Arc::clone(flag));
        match Pin::new(fut).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(p) => Some(p),
            Poll::Pending => None,
        }
    }

    #[test]
    fn fifo_and_budget() {
        let limiter = Limiter::new(Limits {
            max_in_flight: 2,
            max_in_flight_bytes: 100,
        })
        .unwrap();
        let flag = Arc::new(Flag(false.into()));
        let p1 = poll(&mut limiter.acquire(60), &flag).unwrap();
        // 60 + 60 > 100: queues.
        let mut big = limiter.acquire(60);
        assert!(poll(&mut big, &flag).is_none());
        // Would fit, but must not overtake `big`.
        let mut small = limiter.acquire(10);
        assert!(poll(&mut small, &flag).is_none());
        drop(p1);
        let p_big = poll(&mut big, &flag).unwrap();
        let p_small = poll(&mut small, &flag).unwrap();
        assert_eq!(limiter.stats().nr_in_flight, 2);
        // An oversized request is charged the whole budget and runs alone.
        let mut huge = limiter.acquire(1000);
        assert!(poll(&mut huge, &flag).is_none());
        drop((p_big, p_small));
        let p_huge = poll(&mut huge, &flag).unwrap();
        assert_eq!(limiter.stats().nr_in_flight_bytes, 100);
        // A granted waiter that is dropped uncollected gives its grant back.
        let mut abandoned = limiter.acquire(1);
        assert!(poll(&mut abandoned, &flag).is_none());
        drop(p_huge);
        drop(abandoned);
        let stats = limiter.stats();
        assert_eq!((stats.nr_in_flight, stats.nr_in_flight_bytes), (0, 0));
        assert!(stats.max_in_flight_seen <= 2 && stats.max_in_flight_bytes_seen <= 100);
    }
}
