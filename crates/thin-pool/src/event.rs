//! A wake-everyone event that request tasks await on any executor, signalled from any thread
//! (the committer, the background worker, a control operation).
//!
//! A waiter passes a condition; the future is ready as soon as the condition holds. The
//! waker is registered before the condition is checked a second time, so a signal between the
//! two checks is never lost.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub(crate) struct Event {
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    next_id: u64,
    list: Vec<(u64, Waker)>,
}

impl Event {
    /// Wakes every waiter; each re-checks its condition.
    pub fn notify_all(&self) {
        let list = std::mem::take(&mut self.waiters.lock().list);
        for (_, w) in list {
            w.wake();
        }
    }

    /// True when some task waits.
    pub fn has_waiters(&self) -> bool {
        !self.waiters.lock().list.is_empty()
    }

    /// Resolves once `cond()` is true (checked on every wake-up).
    pub fn wait_until<F: FnMut() -> bool>(&self, cond: F) -> WaitUntil<'_, F> {
        WaitUntil {
            event: self,
            cond,
            id: None,
        }
    }

    fn register(&self, id: &mut Option<u64>, waker: &Waker) {
        let mut w = self.waiters.lock();
        if let Some(id) = *id {
            if let Some(slot) = w.list.iter_mut().find(|(i, _)| *i == id) {
                if !slot.1.will_wake(waker) {
                    slot.1 = waker.clone();
                }
                return;
            }
        }
        let new = w.next_id;
        w.next_id += 1;
        w.list.push((new, waker.clone()));
        *id = Some(new);
    }

    fn unregister(&self, id: u64) {
        let mut w = self.waiters.lock();
        if let Some(pos) = w.list.iter().position(|(i, _)| *i == id) {
            w.list.swap_remove(pos);
        }
    }
}

#[must_use = "futures do nothing unless awaited"]
pub(crate) struct WaitUntil<'a, F: FnMut() -> bool> {
    event: &'a Event,
    cond: F,
    id: Option<u64>,
}

impl<F: FnMut() -> bool> Unpin for WaitUntil<'_, F> {}

impl<F: FnMut() -> bool> Future for WaitUntil<'_, F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if (this.cond)() {
            return Poll::Ready(());
        }
        this.event.register(&mut this.id, cx.waker());
        if (this.cond)() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl<F: FnMut() -> bool> Drop for WaitUntil<'_, F> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.event.unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_signal_from_another_thread_wakes_the_waiter() {
        let ev = Arc::new(Event::default());
        let flag = Arc::new(AtomicBool::new(false));
        let (ev2, flag2) = (ev.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            flag2.store(true, Ordering::SeqCst);
            ev2.notify_all();
        });
        block_io::data::rt::block_on(ev.wait_until(|| flag.load(Ordering::SeqCst)));
        t.join().unwrap();
        assert!(
            !ev.has_waiters(),
            "a finished waiter leaves no entry behind"
        );
    }

    #[test]
    fn dropping_a_waiter_unregisters_it() {
        let ev = Event::default();
        let mut fut = Box::pin(ev.wait_until(|| false));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(ev.has_waiters());
        drop(fut);
        assert!(!ev.has_waiters());
    }
}
