//! Dropping data-I/O futures with their SQEs in flight must neither corrupt memory nor leak.
//!
//! io_uring cannot reliably cancel an I/O (seed 001), so a dropped operation's buffer must
//! stay allocated until its CQE. These tests drop reads and writes at every stage (waiting
//! for a permit, queued in the SQ, submitted to the kernel), then allocate canary buffers of
//! the same size: if a buffer had been freed early, the allocator would hand its memory to a
//! canary and the kernel's late read would overwrite the canary with the device's pattern.
//! Leaks show as permits or orphan slots that never return (and under valgrind, which .ci/run
//! runs this file with, as lost blocks).

mod data_common;

use block_io::data::rt::{
    block_on, sleep, FileTarget, OrphanList, RingConfig, RingSubmitter, StandaloneOp,
    StandaloneRing,
};
use block_io::data::{
    DataBlock, DataDevice, DataFile, DirectIo, IoBuf, Limits, Prealloc, UringDataDevice,
};
use data_common::{scratch, Scratch, BLOCK_SIZE, NR_BLOCKS};
use io_uring::squeue;
use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

const OLD: u8 = 0x50;
const NEW: u8 = 0x51;
const CANARY: u8 = 0xc5;

type BoxFut<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

fn poll_once(fut: &mut BoxFut<'_>) -> bool {
    fut.as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

fn create_file(name: &str) -> (DataFile, Scratch) {
    let file = scratch(name);
    let data = DataFile::create(
        &file.0,
        BLOCK_SIZE,
        NR_BLOCKS,
        Prealloc::Allocate,
        DirectIo::Auto,
        &mut |_| {},
    )
    .expect("create data file");
    (data, file)
}

/// Fills every block with `OLD` and flushes.
async fn fill_old<D: DataDevice>(dev: &D) {
    for block in 0..NR_BLOCKS {
        let (res, _) = dev
            .write(DataBlock(block), 0, IoBuf::filled(BLOCK_SIZE as usize, OLD))
            .await;
        res.unwrap();
    }
    dev.flush().await.unwrap();
}

/// Starts whole-block reads of every block and `NEW` writes to blocks 0..8, polls each once,
/// lets the executor submit them, and drops them all.
async fn start_and_drop<D: DataDevice>(dev: &D) {
    let mut futs: Vec<BoxFut<'_>> = Vec::new();
    for block in 0..NR_BLOCKS {
        futs.push(Box::pin(async move {
            let buf = IoBuf::filled(BLOCK_SIZE as usize, CANARY);
            let _ = dev.read(DataBlock(block), 0, buf).await;
        }));
    }
    for block in 0..8 {
        futs.push(Box::pin(async move {
            let buf = IoBuf::filled(BLOCK_SIZE as usize, NEW);
            let _ = dev.write(DataBlock(block), 0, buf).await;
        }));
    }
    for fut in &mut futs {
        poll_once(fut);
    }
    // The executor submits the queued SQEs while it sleeps here; most are still in flight
    // when the sleep ends.
    sleep(Duration::from_micros(50)).await;
    drop(futs);
}

/// Allocates buffers the size of the dropped ones, waits for every orphan's CQE, and checks the
/// canaries were not written.
async fn canaries_survive(mut until_idle: impl FnMut() -> bool) {
    let canaries: Vec<IoBuf> = (0..2 * NR_BLOCKS)
        .map(|_| IoBuf::filled(BLOCK_SIZE as usize, CANARY))
        .collect();
    for _ in 0..10_000 {
        if until_idle() {
            break;
        }
        sleep(Duration::from_micros(100)).await;
    }
    assert!(
        until_idle(),
        "orphaned I/O never completed: {:?}",
        StandaloneRing::stats()
    );
    for (i, canary) in canaries.iter().enumerate() {
        assert!(
            canary.iter().all(|&b| b == CANARY),
            "canary {i} was overwritten: a buffer was freed before its completion"
        );
    }
}

/// Every sector of blocks 0..8 is OLD or NEW; every other block is OLD.
async fn device_intact<D: DataDevice>(dev: &D) {
    for block in 0..NR_BLOCKS {
        let (res, buf) = dev
            .read(DataBlock(block), 0, IoBuf::new(BLOCK_SIZE as usize))
            .await;
        res.unwrap();
        for sector in buf.chunks(512) {
            let ok =
                sector.iter().all(|&b| b == OLD) || (block < 8 && sector.iter().all(|&b| b == NEW));
            assert!(ok, "block {block} holds bytes no write put there");
        }
    }
}

#[test]
fn dropped_futures_keep_buffers_until_completion() {
    let (file, _guard) = create_file("cancel");
    let limits = Limits {
        max_in_flight: 64,
        max_in_flight_bytes: 64 << 20,
    };
    let dev = UringDataDevice::new(file, limits, RingConfig::default()).unwrap();
    block_on(async {
        fill_old(&dev).await;
        let mut max_orphans = 0;
        for _ in 0..5 {
            start_and_drop(&dev).await;
            max_orphans = max_orphans.max(StandaloneRing::stats().nr_orphans);
            canaries_survive(|| {
                StandaloneRing::stats().nr_orphans == 0 && dev.limiter_stats().nr_in_flight == 0
            })
            .await;
            device_intact(&dev).await;
        }
        // Otherwise the test proved nothing: every I/O finished before its future was dropped.
        assert!(
            max_orphans > 0,
            "no future was dropped with its I/O in flight"
        );
        eprintln!("dropped with I/O in flight: up to {max_orphans} operations");
    });
    let stats = dev.limiter_stats();
    assert_eq!(
        (stats.nr_in_flight, stats.nr_in_flight_bytes),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(StandaloneRing::stats().nr_in_flight, 0);
}

#[test]
fn dropped_while_queued_for_a_permit() {
    let (file, _guard) = create_file("cancel-permit");
    let limits = Limits {
        max_in_flight: 2,
        max_in_flight_bytes: 2 * BLOCK_SIZE as usize,
    };
    let dev = UringDataDevice::new(file, limits, RingConfig::default()).unwrap();
    block_on(async {
        fill_old(&dev).await;
        // Two submit, thirty-eight wait in the limiter's FIFO; all are dropped.
        start_and_drop(&dev).await;
        canaries_survive(|| dev.limiter_stats().nr_in_flight == 0).await;
        // The queue is empty again: a new request is granted at once.
        device_intact(&dev).await;
    });
    assert!(dev.limiter_stats().nr_waited > 0);
}

#[test]
fn thread_exit_waits_for_orphans() {
    let (file, _guard) = create_file("cancel-exit");
    let dev =
        Arc::new(UringDataDevice::new(file, Limits::default(), RingConfig::default()).unwrap());
    block_on(fill_old(&*dev));
    let worker = Arc::clone(&dev);
    std::thread::spawn(move || {
        // This thread's own ring carries the I/O; the thread ends with it in flight, and its
        // ring must drain before the buffers go.
        block_on(start_and_drop(&*worker));
    })
    .join()
    .unwrap();
    let stats = dev.limiter_stats();
    assert_eq!(
        stats.nr_in_flight, 0,
        "permits of a dead thread's I/O leaked: {stats:?}"
    );
    block_on(device_intact(&*dev));
}

/// A ring like libublk's, whose op futures cannot carry memory: abandoned ops go to an
/// `OrphanList`, reaped on each push.
struct ExternalRing {
    inner: StandaloneRing,
    orphans: OrphanList<StandaloneOp>,
}

impl RingSubmitter for ExternalRing {
    type Op = StandaloneOp;

    unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<StandaloneOp> {
        self.orphans.reap();
        // SAFETY: forwarded from this function's contract.
        unsafe { self.inner.push(sqe) }
    }

    fn detach(&self, op: StandaloneOp, keepalive: Box<dyn Any>) {
        self.orphans.push(op, keepalive);
    }

    fn file_target(&self, file: &Arc<DataFile>) -> FileTarget {
        self.inner.file_target(file)
    }
}

#[test]
fn external_ring_keeps_orphans_in_its_list() {
    let (file, _guard) = create_file("cancel-external");
    let ring = ExternalRing {
        inner: StandaloneRing::default(),
        orphans: OrphanList::default(),
    };
    let dev = UringDataDevice::with_ring(Arc::new(file), Limits::default(), ring).unwrap();
    block_on(async {
        fill_old(&dev).await;
        start_and_drop(&dev).await;
    });
    // The ring reaps the orphans' CQEs; the list frees their memory when it sees them.
    block_on(async {
        canaries_survive(|| {
            dev.ring().orphans.reap() == 0 && dev.limiter_stats().nr_in_flight == 0
        })
        .await;
        device_intact(&dev).await;
    });
}
