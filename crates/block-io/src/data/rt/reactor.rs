//! The standalone ring: one io_uring per thread, for every data device used on that thread
//! (seed 001: share one context rather than one per user), driven by `rt::block_on`.
//!
//! Each pushed SQE gets a slot in a slab; its `user_data` is the slot key. A slot is
//! `Waiting` (an `Op` future awaits it), `Done` (the CQE arrived, the future has not looked
//! yet) or `Orphan` (the future was dropped: the slot holds the SQE's memory until the CQE).
//! Files are registered lazily in a small sparse table, keyed by a `Weak` to the file so a
//! dead file's slot is reused and never names a different file while it is in use.
//!
//! Invariants: a slot is removed only after its CQE was reaped (`Done` consumed by its future,
//! or an `Orphan` reaped), so an SQE's memory outlives its CQE; the reactor drains every
//! in-flight SQE before its ring is closed (thread exit), leaking rather than freeing memory
//! the kernel might still write; keepalives and wakers run outside the reactor's `RefCell`
//! borrow, so they may push new SQEs.

use super::ring::{FileTarget, RingSubmitter};
use crate::data::file::DataFile;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Registered-file slots per ring; a file beyond them is used by plain fd.
const MAX_FIXED_FILES: u32 = 16;
/// `user_data` of the eventfd read that lets other threads wake a thread sleeping in the ring.
const NOTIFY_USER_DATA: u64 = u64::MAX;
/// Attempts to find room in a full submission queue before giving up with EBUSY.
const MAX_PUSH_ATTEMPTS: usize = 8;

/// How to build a thread's standalone ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue gets twice as many).
    pub sq_entries: u32,
    /// Test hook: make ring setup fail with this errno instead of calling `io_uring_setup`,
    /// as a kernel with io_uring disabled (EPERM), absent (ENOSYS) or a low memlock limit
    /// (ENOMEM) would. It is per configuration, so it cannot leak between tests.
    pub fail_setup_with: Option<i32>,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            sq_entries: 256,
            fail_setup_with: None,
        }
    }
}

enum SlotState {
    Waiting(Option<Waker>),
    Done(i32),
    Orphan(Box<dyn Any>),
}

struct FileSlot {
    id: u64,
    file: Weak<DataFile>,
}

struct Notify {
    fd: Arc<OwnedFd>,
    /// The eventfd read's 8-byte target; boxed so its address is stable.
    buf: Box<u64>,
    armed: bool,
}

/// Counters of the current thread's ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// SQEs pushed and not yet reaped, abandoned ones included.
    pub nr_in_flight: usize,
    /// In-flight SQEs whose future was dropped: their memory waits for the CQE.
    pub nr_orphans: usize,
    /// Slots of the fixed-file table holding a file (the kernel keeps each open).
    pub nr_fixed_files: usize,
}

pub(crate) struct Reactor {
    ring: IoUring,
    slots: Slab<SlotState>,
    nr_orphans: usize,
    /// `None` when the kernel refused a sparse file table.
    files: Option<Vec<Option<FileSlot>>>,
    notify: Option<Notify>,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

/// The opcodes the engine needs; a ring without any of them is treated as unavailable.
const REQUIRED_OPCODES: [(u8, &str); 6] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

impl Reactor {
    fn new(config: &RingConfig) -> io::Result<Self> {
        if let Some(errno) = config.fail_setup_with {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let entries = config.sq_entries.max(1);
        // COOP_TASKRUN and SINGLE_ISSUER suit a ring only its own thread touches; older
        // kernels reject them with EINVAL, so retry plain before giving up.
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(entries)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => IoUring::builder()
                    .setup_cqsize(entries.saturating_mul(2))
                    .build(entries),
                _ => Err(e),
            })?;
        let mut probe = io_uring::Probe::new();
        if ring.submitter().register_probe(&mut probe).is_ok() {
            for (code, name) in REQUIRED_OPCODES {
                if !probe.is_supported(code) {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("the kernel's io_uring lacks IORING_OP_{name}"),
                    ));
                }
            }
        }
        let files = ring
            .submitter()
            .register_files_sparse(MAX_FIXED_FILES)
            .ok()
            .map(|()| (0..MAX_FIXED_FILES).map(|_| None).collect());
        // Blocking on purpose: io_uring returns EAGAIN for an O_NONBLOCK file instead of
        // waiting for it to become readable.
        // SAFETY: plain syscall; the returned fd (if any) is owned by nobody else.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let notify = (efd >= 0).then(|| Notify {
            // SAFETY: `efd` is a fresh, valid fd that only this `OwnedFd` will close.
            fd: Arc::new(unsafe { OwnedFd::from_raw_fd(efd) }),
            buf: Box::new(0),
            armed: false,
        });
        Ok(Self {
            ring,
            slots: Slab::new(),
            nr_orphans: 0,
            files,
            notify,
        })
    }

    fn stats(&self) -> RingStats {
        RingStats {
            nr_in_flight: self.slots.len(),
            nr_orphans: self.nr_orphans,
            nr_fixed_files: self
                .files
                .as_ref()
                .map_or(0, |files| files.iter().flatten().count()),
        }
    }

    /// Pushes one SQE, flushing (and if need be reaping) to make room in a full queue.
    ///
    /// # Safety
    /// As `RingSubmitter::push`.
    unsafe fn push_entry(
        &mut self,
        sqe: &squeue::Entry,
        done: &mut Vec<Finished>,
    ) -> io::Result<()> {
        for _ in 0..MAX_PUSH_ATTEMPTS {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                // The kernel has no room for more completions: make some.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.reap(done);
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue stayed full; lower the engine's max_in_flight or raise \
             the ring's sq_entries",
        ))
    }

    /// Moves every available CQE into its slot. Wakers and dropped keepalives go to `done`,
    /// to be run after the borrow of the reactor ends.
    fn reap(&mut self, done: &mut Vec<Finished>) {
        for cqe in self.ring.completion() {
            let user_data = cqe.user_data();
            if user_data == NOTIFY_USER_DATA {
                if let Some(notify) = self.notify.as_mut() {
                    notify.armed = false;
                }
                continue;
            }
            let key = user_data as usize;
            let Some(state) = self.slots.get_mut(key) else {
                panic!("io_uring CQE for unknown slot {key}");
            };
            match std::mem::replace(state, SlotState::Done(cqe.result())) {
                SlotState::Waiting(waker) => done.extend(waker.map(Finished::Wake)),
                SlotState::Orphan(keepalive) => {
                    self.slots.remove(key);
                    self.nr_orphans -= 1;
                    done.push(Finished::Drop(keepalive));
                }
                SlotState::Done(_) => panic!("two CQEs for io_uring slot {key}"),
            }
        }
    }

    /// Blocks until at least one CQE (or `timeout`, or a wake from another thread), then reaps.
    /// Returns false if nothing is in flight, so waiting here would never end.
    fn wait(&mut self, timeout: Option<Duration>, done: &mut Vec<Finished>) -> io::Result<bool> {
        if self.slots.is_empty() && self.ring.submission().is_empty() {
            return Ok(false);
        }
        self.arm_notify(done)?;
        if !done.is_empty() {
            // Making room for the eventfd read reaped completions: their futures must run
            // before anything blocks, or the thread could sleep on work that is already done.
            return Ok(true);
        }
        let res = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(done);
        Ok(true)
    }

    /// Keeps a read of the eventfd queued while the thread may sleep in the ring, so a waker
    /// on another thread can end the sleep by writing to it.
    fn arm_notify(&mut self, done: &mut Vec<Finished>) -> io::Result<()> {
        let Some(notify) = self.notify.as_mut() else {
            return Ok(());
        };
        if notify.armed {
            return Ok(());
        }
        let buf: *mut u64 = &mut *notify.buf;
        let sqe = opcode::Read::new(types::Fd(notify.fd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(NOTIFY_USER_DATA);
        notify.armed = true;
        // SAFETY: the buffer and the eventfd are owned by the reactor, which drains the ring
        // (this read included) before dropping either.
        unsafe { self.push_entry(&sqe, done) }
    }

    fn notify_fd(&self) -> Option<Arc<OwnedFd>> {
        self.notify.as_ref().map(|n| Arc::clone(&n.fd))
    }

    fn file_target(&mut self, file: &Arc<DataFile>) -> FileTarget {
        let plain = FileTarget::Fd(file.as_raw_fd());
        let Some(files) = self.files.as_mut() else {
            return plain;
        };
        if let Some(i) = files.iter().position(|s| {
            s.as_ref()
                .is_some_and(|s| s.id == file.id() && s.file.strong_count() > 0)
        }) {
            return FileTarget::Fixed(i as u32);
        }
        // A slot whose file is gone is free: no SQE can use it, since in-flight SQEs keep
        // their file alive.
        let Some(i) = files
            .iter()
            .position(|s| s.as_ref().is_none_or(|s| s.file.strong_count() == 0))
        else {
            return plain;
        };
        match self
            .ring
            .submitter()
            .register_files_update(i as u32, &[file.as_raw_fd()])
        {
            Ok(_) => {
                files[i] = Some(FileSlot {
                    id: file.id(),
                    file: Arc::downgrade(file),
                });
                FileTarget::Fixed(i as u32)
            }
            Err(_) => plain,
        }
    }
}

impl Reactor {
    fn forget_file(&mut self, id: u64) {
        let Some(files) = self.files.as_mut() else {
            return;
        };
        for (i, slot) in files.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|s| s.id == id) {
                // -1 empties the slot; SQEs already issued keep their file until they finish.
                if self
                    .ring
                    .submitter()
                    .register_files_update(i as u32, &[-1])
                    .is_ok()
                {
                    *slot = None;
                }
            }
        }
    }
}

impl Drop for Reactor {
    /// Waits for every in-flight SQE: the kernel may write their buffers until their CQEs.
    fn drop(&mut self) {
        if let Some(notify) = self.notify.as_ref().filter(|n| n.armed) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local to the reactor's own eventfd, which
            // completes the armed read.
            unsafe { libc::write(notify.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        let mut done = Vec::new();
        while !self.slots.is_empty() || self.notify.as_ref().is_some_and(|n| n.armed) {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::ETIME)
                ) {
                    // The ring is unusable, so its CQEs can never be seen: leak everything the
                    // kernel may still touch rather than free it.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    if let Some(notify) = self.notify.take() {
                        std::mem::forget(notify);
                    }
                    break;
                }
            }
            self.reap(&mut done);
            // Waiting futures of a dying thread cannot run; drop what finished.
            let finished: Vec<usize> = self
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, SlotState::Done(_)))
                .map(|(k, _)| k)
                .collect();
            for key in finished {
                self.slots.remove(key);
            }
            done.clear();
        }
    }
}

/// Work that must run after the reactor borrow ends.
pub(crate) enum Finished {
    Wake(Waker),
    Drop(#[allow(dead_code, reason = "held only to be dropped")] Box<dyn Any>),
}

pub(crate) fn run_finished(done: Vec<Finished>) {
    for f in done {
        if let Finished::Wake(waker) = f {
            waker.wake();
        }
    }
}

fn not_initialized() -> io::Error {
    io::Error::other(
        "this thread has no io_uring: call StandaloneRing::init (or open the device) on it first",
    )
}

/// Runs `f` on this thread's reactor, then the wakers and drops it queued.
fn with_reactor<T>(
    f: impl FnOnce(&mut Reactor, &mut Vec<Finished>) -> io::Result<T>,
) -> io::Result<T> {
    let mut done = Vec::new();
    let res = REACTOR.with(|cell| match cell.borrow_mut().as_mut() {
        Some(reactor) => f(reactor, &mut done),
        None => Err(not_initialized()),
    });
    run_finished(done);
    res
}

/// Blocks in the ring for at least one completion; false if nothing is in flight or there is
/// no ring. Called by the executor only.
pub(crate) fn wait(timeout: Option<Duration>) -> io::Result<bool> {
    let has_ring = REACTOR.with(|cell| cell.borrow().is_some());
    if !has_ring {
        return Ok(false);
    }
    with_reactor(|r, done| r.wait(timeout, done))
}

/// The eventfd that wakes this thread out of the ring, if it has a ring.
pub(crate) fn notify_fd() -> Option<Arc<OwnedFd>> {
    REACTOR.with(|cell| cell.borrow().as_ref().and_then(Reactor::notify_fd))
}

/// The current thread's standalone io_uring. A small `Copy` handle: every method acts on the
/// ring of the thread that calls it (created on first use with this handle's config), so an
/// engine shared by several threads submits each I/O on its caller's ring. Its ops complete
/// only while `rt::block_on` runs on that thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandaloneRing {
    config: RingConfig,
}

impl StandaloneRing {
    /// A handle whose rings are built with `config`.
    pub fn new(config: RingConfig) -> Self {
        Self { config }
    }

    /// Creates this thread's ring if it has none. Fails with the setup error (ENOSYS, EPERM,
    /// ENOMEM, ...) so the caller can fall back to synchronous I/O.
    pub fn init(&self) -> io::Result<()> {
        if let Some(errno) = self.config.fail_setup_with {
            return Err(io::Error::from_raw_os_error(errno));
        }
        REACTOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Reactor::new(&self.config)?);
            }
            Ok(())
        })
    }

    /// Counters of this thread's ring (all zero without one).
    pub fn stats() -> RingStats {
        REACTOR.with(|cell| {
            cell.borrow()
                .as_ref()
                .map(Reactor::stats)
                .unwrap_or_default()
        })
    }
}

/// One SQE on the standalone ring. Not `Send`: its slot lives in this thread's ring.
#[derive(Debug)]
pub struct StandaloneOp {
    key: usize,
    resolved: bool,
    _not_send: PhantomData<*const ()>,
}

impl std::future::Future for StandaloneOp {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let key = self.key;
        let res = REACTOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            let Some(reactor) = cell.as_mut() else {
                panic!("StandaloneOp polled on a thread without its ring");
            };
            match reactor.slots.get_mut(key) {
                Some(SlotState::Done(res)) => {
                    let res = *res;
                    reactor.slots.remove(key);
                    Poll::Ready(res)
                }
                Some(SlotState::Waiting(waker)) => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                _ => panic!("StandaloneOp slot {key} is not its own"),
            }
        });
        if res.is_ready() {
            self.resolved = true;
        }
        res
    }
}

impl Drop for StandaloneOp {
    fn drop(&mut self) {
        if !self.resolved {
            // Only reached when dropped outside `InFlight`, which detaches with a keepalive.
            detach_slot(self.key, Box::new(()));
        }
    }
}

/// Turns slot `key` into an orphan holding `keepalive`, or frees it if its CQE already came.
fn detach_slot(key: usize, keepalive: Box<dyn Any>) {
    let mut late = None;
    // `try_with`: during thread exit the reactor may be gone, and it drained the ring first.
    let _ = REACTOR.try_with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(reactor) = cell.as_mut() else { return };
        match reactor.slots.get_mut(key) {
            Some(SlotState::Done(_)) => {
                reactor.slots.remove(key);
            }
            Some(state @ SlotState::Waiting(_)) => {
                *state = SlotState::Orphan(keepalive);
                reactor.nr_orphans += 1;
                return;
            }
            _ => panic!("detaching io_uring slot {key}, which is not in flight"),
        }
        late = Some(keepalive);
    });
    drop(late);
}

impl RingSubmitter for StandaloneRing {
    type Op = StandaloneOp;

    unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<StandaloneOp> {
        self.init()?;
        with_reactor(|reactor, done| {
            let entry = reactor.slots.vacant_entry();
            let key = entry.key();
            entry.insert(SlotState::Waiting(None));
            let sqe = sqe.user_data(key as u64);
            // SAFETY: forwarded from this function's contract.
            match unsafe { reactor.push_entry(&sqe, done) } {
                Ok(()) => Ok(StandaloneOp {
                    key,
                    resolved: false,
                    _not_send: PhantomData,
                }),
                Err(e) => {
                    reactor.slots.remove(key);
                    Err(e)
                }
            }
        })
    }

    fn detach(&self, mut op: StandaloneOp, keepalive: Box<dyn Any>) {
        op.resolved = true;
        detach_slot(op.key, keepalive);
    }

    fn file_target(&self, file: &Arc<DataFile>) -> FileTarget {
        REACTOR.with(|cell| match cell.borrow_mut().as_mut() {
            Some(reactor) => reactor.file_target(file),
            None => FileTarget::Fd(file.as_raw_fd()),
        })
    }

    fn forget_file(&self, file: &Arc<DataFile>) {
        // `try_*`: an engine may be dropped during thread exit or from inside a reap.
        let _ = REACTOR.try_with(|cell| {
            if let Ok(mut cell) = cell.try_borrow_mut() {
                if let Some(reactor) = cell.as_mut() {
                    reactor.forget_file(file.id());
                }
            }
        });
    }
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("stats", &self.stats())
            .finish()
    }
}
