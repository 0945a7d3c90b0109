//! A tiny single-threaded executor: `block_on` runs one future (use `join_all` inside it for
//! concurrency) and, whenever that future waits, sleeps in the thread's standalone ring until a
//! completion, a timer or a wake from another thread arrives. No thread per I/O (seed 002).
//!
//! Timers (`sleep`) live in a thread-local heap the executor consults for its wait timeout, so
//! they work with or without io_uring (latency injection on the sync fallback included).
//!
//! Invariants: `block_on` is not re-entered on one thread; it never blocks while a wake is
//! pending (the `woken` flag is checked after announcing the sleep, and a waker that sees the
//! announcement writes the ring's eventfd or unparks the thread); every wait is bounded by the
//! next timer deadline.

use super::reactor;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

const AWAKE: u8 = 0;
const PARKED: u8 = 1;
const IN_RING: u8 = 2;

struct MainWaker {
    woken: AtomicBool,
    sleep: AtomicU8,
    thread: Thread,
    /// The ring's eventfd, once the thread has a ring (it may be created inside `block_on`).
    notify: OnceLock<Arc<OwnedFd>>,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        match self.sleep.load(Ordering::SeqCst) {
            PARKED => self.thread.unpark(),
            // On its own thread the executor is not inside the ring (it is reaping), so only a
            // wake from another thread needs the eventfd.
            IN_RING if self.thread.id() != thread::current().id() => {
                if let Some(fd) = self.notify.get() {
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a live local to an eventfd this waker keeps
                    // open; a failure only means the thread wakes at its next completion.
                    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
                }
            }
            _ => {}
        }
    }
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    wakers: HashMap<u64, Waker>,
    next_id: u64,
}

impl Timers {
    /// Wakes every due timer and returns the next deadline.
    fn fire_due(&mut self, now: Instant) -> (Vec<Waker>, Option<Instant>) {
        let mut due = Vec::new();
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if !self.wakers.contains_key(&id) {
                self.heap.pop(); // cancelled
                continue;
            }
            if deadline > now {
                return (due, Some(deadline));
            }
            self.heap.pop();
            due.extend(self.wakers.remove(&id));
        }
        (due, None)
    }
}

thread_local! {
    static TIMERS: RefCell<Timers> = RefCell::new(Timers::default());
    static IN_BLOCK_ON: Cell<bool> = const { Cell::new(false) };
}

/// Runs `fut` to completion on this thread, driving its standalone ring and timers.
///
/// # Panics
/// If called from inside `block_on` on the same thread, or if the ring fails in a way that
/// leaves no means to wait (a broken ring fd).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct Exit;
    impl Drop for Exit {
        fn drop(&mut self) {
            IN_BLOCK_ON.with(|b| b.set(false));
        }
    }
    assert!(
        !IN_BLOCK_ON.with(|b| b.replace(true)),
        "block_on is not re-entrant"
    );
    let _exit = Exit;

    let main = Arc::new(MainWaker {
        woken: AtomicBool::new(true),
        sleep: AtomicU8::new(AWAKE),
        thread: thread::current(),
        notify: OnceLock::new(),
    });
    let waker = Waker::from(Arc::clone(&main));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        if main.woken.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            continue;
        }
        let (due, next_deadline) = TIMERS.with(|t| t.borrow_mut().fire_due(Instant::now()));
        if !due.is_empty() {
            due.into_iter().for_each(Waker::wake);
            continue;
        }
        let timeout = next_deadline.map(|d| d.saturating_duration_since(Instant::now()));

        if main.notify.get().is_none() {
            if let Some(fd) = reactor::notify_fd() {
                let _ = main.notify.set(fd);
            }
        }
        main.sleep.store(IN_RING, Ordering::SeqCst);
        if !main.woken.load(Ordering::SeqCst) {
            match reactor::wait(timeout) {
                Ok(true) => {}
                Ok(false) => {
                    // Nothing in the ring: only a timer or another thread can wake us.
                    main.sleep.store(PARKED, Ordering::SeqCst);
                    if !main.woken.load(Ordering::SeqCst) {
                        match timeout {
                            Some(t) => thread::park_timeout(t),
                            None => thread::park(),
                        }
                    }
                }
                Err(e) => panic!("block_on: waiting on the io_uring failed: {e}"),
            }
        }
        main.sleep.store(AWAKE, Ordering::SeqCst);
    }
}

/// Completes after `duration`, on `block_on`'s timer heap (it never fires elsewhere).
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        deadline: Instant::now() + duration,
        id: None,
    }
}

/// The future of `sleep`.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(id) = self.id.take() {
                TIMERS.with(|t| t.borrow_mut().wakers.remove(&id));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let id = *self.id.get_or_insert_with(|| {
            TIMERS.with(|t| {
                let mut t = t.borrow_mut();
                let id = t.next_id;
                t.next_id += 1;
                t.heap.push(Reverse((deadline, id)));
                id
            })
        });
        TIMERS.with(|t| t.borrow_mut().wakers.insert(id, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let _ = TIMERS.try_with(|t| t.borrow_mut().wakers.remove(&id));
        }
    }
}

/// Yields once to the executor, letting other futures of a `join_all` run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

struct ReadyList {
    indexes: Mutex<Vec<usize>>,
    parent: Mutex<Option<Waker>>,
}

struct ChildWaker {
    index: usize,
    list: Arc<ReadyList>,
}

impl Wake for ChildWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.list.indexes).push(self.index);
        if let Some(parent) = lock(&self.list.parent).as_ref() {
            parent.wake_by_ref();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs every future concurrently; resolves to their outputs in order. Each future has its own
/// waker, so a completion polls only the future it belongs to.
pub fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> JoinAll<F> {
    let futs: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let n = futs.len();
    let list = Arc::new(ReadyList {
        indexes: Mutex::new((0..n).collect()),
        parent: Mutex::new(None),
    });
    let wakers = (0..n)
        .map(|index| {
            Waker::from(Arc::new(ChildWaker {
                index,
                list: Arc::clone(&list),
            }))
        })
        .collect();
    JoinAll {
        outputs: (0..n).map(|_| None).collect(),
        futs,
        wakers,
        list,
        nr_pending: n,
    }
}

/// The future of `join_all`.
#[must_use = "futures do nothing unless awaited"]
pub struct JoinAll<F: Future> {
    futs: Vec<Option<Pin<Box<F>>>>,
    outputs: Vec<Option<F::Output>>,
    wakers: Vec<Waker>,
    list: Arc<ReadyList>,
    nr_pending: usize,
}

impl<F: Future> fmt::Debug for JoinAll<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinAll")
            .field("nr_futures", &self.futs.len())
            .field("nr_pending", &self.nr_pending)
            .finish()
    }
}

impl<F: Future> Unpin for JoinAll<F> {}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<F::Output>> {
        let this = &mut *self;
        {
            let mut parent = lock(&this.list.parent);
            if !parent.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *parent = Some(cx.waker().clone());
            }
        }
        let ready = std::mem::take(&mut *lock(&this.list.indexes));
        for index in ready {
            let Some(fut) = this.futs[index].as_mut() else {
                continue; // finished; a stale wake
            };
            let mut child_cx = Context::from_waker(&this.wakers[index]);
            if let Poll::Ready(out) = fut.as_mut().poll(&mut child_cx) {
                this.futs[index] = None;
                this.outputs[index] = Some(out);
                this.nr_pending -= 1;
            }
        }
        if this.nr_pending > 0 {
            return Poll::Pending;
        }
        let outputs = std::mem::take(&mut this.outputs);
        Poll::Ready(
            outputs
                .into_iter()
                .map(|o| o.expect("joined output"))
                .collect(),
        )
    }
}
