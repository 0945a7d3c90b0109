//! Paths the conformance suite cannot reach on a healthy regular file: short transfers and
//! EAGAIN (from a ring that reports them), the primitive each zero and discard picks,
//! preallocation, and block devices (a loop device, when the host lets us make one).

mod data_common;

use block_io::data::rt::{block_on, FileTarget, RingSubmitter, StandaloneOp, StandaloneRing};
use block_io::data::{
    DataBlock, DataDevice, DataDeviceOptions, DataFile, DirectIo, DiscardPolicy, EngineChoice,
    EngineKind, IoBuf, Limits, Prealloc, Primitive, UringDataDevice,
};
use data_common::{run_model, scratch, seed, BLOCK_SIZE, NR_BLOCKS};
use io_uring::squeue;
use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A ring that reports every third successful transfer as short (one alignment unit) and
/// every third as EAGAIN, after the kernel really did it: the engine must resubmit the rest
/// (or all) and still produce exactly the right bytes.
struct FlakyRing {
    inner: StandaloneRing,
    align: i32,
    nr_ops: Cell<u64>,
    nr_short: Cell<u64>,
    nr_eagain: Cell<u64>,
}

struct FlakyOp<'a> {
    inner: StandaloneOp,
    ring: &'a FlakyRing,
    mode: u64,
}

impl Future for FlakyOp<'_> {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let res = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let ring = self.ring;
        Poll::Ready(match self.mode {
            1 if res > ring.align => {
                ring.nr_short.set(ring.nr_short.get() + 1);
                ring.align
            }
            2 if res > 0 => {
                ring.nr_eagain.set(ring.nr_eagain.get() + 1);
                -libc::EAGAIN
            }
            _ => res,
        })
    }
}

impl<'a> RingSubmitter for &'a FlakyRing {
    type Op = FlakyOp<'a>;

    unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<FlakyOp<'a>> {
        let n = self.nr_ops.get();
        self.nr_ops.set(n + 1);
        // SAFETY: forwarded from this function's contract.
        let inner = unsafe { self.inner.push(sqe) }?;
        Ok(FlakyOp {
            inner,
            ring: self,
            mode: n % 3,
        })
    }

    fn detach(&self, op: FlakyOp<'a>, keepalive: Box<dyn Any>) {
        self.inner.detach(op.inner, keepalive);
    }

    fn file_target(&self, file: &Arc<DataFile>) -> FileTarget {
        self.inner.file_target(file)
    }
}

fn create_file(path: &Path) -> DataFile {
    DataFile::create(
        path,
        BLOCK_SIZE,
        NR_BLOCKS,
        Prealloc::Allocate,
        DirectIo::Auto,
        &mut |_| {},
    )
    .expect("create data file")
}

#[test]
fn short_transfers_and_eagain_are_resubmitted() {
    let file = scratch("flaky");
    let data = create_file(&file.0);
    let ring = FlakyRing {
        inner: StandaloneRing::default(),
        align: data.geometry().align_bytes as i32,
        nr_ops: Cell::new(0),
        nr_short: Cell::new(0),
        nr_eagain: Cell::new(0),
    };
    let limits = Limits {
        max_in_flight: 4,
        max_in_flight_bytes: 1 << 20,
    };
    let dev = UringDataDevice::with_ring(Arc::new(data), limits, &ring).unwrap();
    block_on(run_model(&dev, seed(11), 4, 200));
    assert!(ring.nr_short.get() > 50, "{}", ring.nr_short.get());
    assert!(ring.nr_eagain.get() > 50, "{}", ring.nr_eagain.get());
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn preallocation_modes() {
    let len = BLOCK_SIZE * NR_BLOCKS;
    for (prealloc, allocated) in [
        (Prealloc::Sparse, false),
        (Prealloc::Allocate, true),
        (Prealloc::WriteZeroes, true),
    ] {
        let file = scratch("prealloc");
        let dev = DataDeviceOptions::new(BLOCK_SIZE)
            .direct(DirectIo::Auto)
            .on_warning(|_| {})
            .create(&file.0, NR_BLOCKS, prealloc)
            .unwrap();
        assert_eq!(std::fs::metadata(&file.0).unwrap().len(), len);
        let bytes = allocated_bytes(&file.0);
        assert_eq!(
            bytes >= len,
            allocated,
            "{prealloc:?}: {bytes} bytes allocated"
        );
        drop(dev);
    }
}

#[test]
fn zero_and_discard_pick_the_cheapest_primitive() {
    for engine in [EngineChoice::Uring, EngineChoice::Sync] {
        for (policy, discard_primitive) in [
            (DiscardPolicy::PunchHole, Primitive::FallocPunchHole),
            (DiscardPolicy::ZeroRange, Primitive::FallocZeroRange),
            (DiscardPolicy::Ignore, Primitive::Ignored),
        ] {
            let file = scratch("primitive");
            let dev = DataDeviceOptions::new(BLOCK_SIZE)
                .engine(engine)
                .direct(DirectIo::Auto)
                .discard_policy(policy)
                .on_warning(|_| {})
                .create(&file.0, NR_BLOCKS, Prealloc::Allocate)
                .unwrap();
            let full = allocated_bytes(&file.0);
            block_on(async {
                let (res, _) = dev
                    .write(DataBlock(1), 0, IoBuf::filled(BLOCK_SIZE as usize, 7))
                    .await;
                res.unwrap();
                let zero = dev.zero_blocks(DataBlock(1), 1).await.unwrap();
                assert_eq!(zero, Primitive::FallocZeroRange, "{engine:?}");
                // Zeroing keeps the allocation: a later write there does not stall.
                assert_eq!(allocated_bytes(&file.0), full, "{engine:?}");
                let (_, buf) = dev
                    .read(DataBlock(1), 0, IoBuf::filled(BLOCK_SIZE as usize, 1))
                    .await;
                assert!(buf.iter().all(|&b| b == 0));
                let discard = dev.discard_blocks(DataBlock(2), 4).await.unwrap();
                assert_eq!(discard, discard_primitive, "{engine:?} {policy:?}");
            });
            let after = allocated_bytes(&file.0);
            match policy {
                DiscardPolicy::PunchHole => assert!(after <= full - 4 * BLOCK_SIZE, "{after}"),
                _ => assert_eq!(after, full, "{engine:?} {policy:?}"),
            }
        }
    }
}

/// A loop device over a scratch file, detached on drop.
struct LoopDevice {
    dev: String,
    _backing: data_common::Scratch,
}

impl LoopDevice {
    fn new() -> Option<Self> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: loop devices need root");
            return None;
        }
        let backing = scratch("loop-backing");
        let file = std::fs::File::create(&backing.0).ok()?;
        file.set_len(BLOCK_SIZE * NR_BLOCKS).ok()?;
        drop(file);
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&backing.0)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self {
                dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                _backing: backing,
            }),
            other => {
                eprintln!("SKIP: cannot set up a loop device: {other:?}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn block_device_engines_use_blkzeroout_and_blkdiscard() {
    let Some(loop_dev) = LoopDevice::new() else {
        return;
    };
    for (engine, kind) in [
        (EngineChoice::Uring, EngineKind::Uring),
        (EngineChoice::Sync, EngineKind::Sync),
    ] {
        let dev = DataDeviceOptions::new(BLOCK_SIZE)
            .engine(engine)
            .on_warning(|line| panic!("unexpected warning: {line}"))
            .open(&loop_dev.dev)
            .unwrap_or_else(|e| panic!("opening {}: {e}", loop_dev.dev));
        assert_eq!(dev.kind(), kind);
        assert_eq!(dev.geometry().nr_blocks, NR_BLOCKS);
        block_on(async {
            let zero = dev.zero_blocks(DataBlock(0), 2).await.unwrap();
            assert_eq!(zero, Primitive::BlkZeroOut, "{engine:?}");
            let discard = dev.discard_blocks(DataBlock(2), 2).await.unwrap();
            // A loop device passes discards to its backing file.
            assert!(
                matches!(discard, Primitive::BlkDiscard | Primitive::Ignored),
                "{engine:?}: {discard:?}"
            );
            // The model starts from zeros; the previous engine left data behind.
            dev.zero_blocks(DataBlock(0), NR_BLOCKS).await.unwrap();
            run_model(&dev, seed(13), 4, 150).await;
        });
    }
    // The engines are gone, and the standalone ring let go of the device: nothing keeps it
    // open (and busy) behind the application's back.
    assert_eq!(StandaloneRing::stats().nr_fixed_files, 0);
}

#[test]
fn a_grown_file_is_seen_by_every_engine_after_refresh() {
    let file = scratch("grow");
    let data = Arc::new(create_file(&file.0));
    let dev =
        UringDataDevice::with_ring(data.clone(), Limits::default(), StandaloneRing::default())
            .expect("engine");
    let past = DataBlock(NR_BLOCKS);
    let (r, _) = block_on(dev.write(past, 0, IoBuf::filled(4096, 7)));
    assert!(r.is_err(), "a block past the end is refused");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .and_then(|f| f.set_len((NR_BLOCKS + 3) * BLOCK_SIZE))
        .expect("grow the file");
    assert_eq!(
        dev.geometry().nr_blocks,
        NR_BLOCKS,
        "nothing changes before refresh"
    );
    assert_eq!(data.refresh_size().expect("refresh"), NR_BLOCKS + 3);
    assert_eq!(dev.geometry().nr_blocks, NR_BLOCKS + 3);
    let (r, _) = block_on(dev.write(past, 0, IoBuf::filled(4096, 7)));
    r.expect("the new block is writable");
    let (r, buf) = block_on(dev.read(past, 0, IoBuf::new(4096)));
    r.expect("read back");
    assert!(buf.iter().all(|&b| b == 7));
    // Shrinking the file never takes blocks away from the geometry.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .and_then(|f| f.set_len(NR_BLOCKS * BLOCK_SIZE))
        .expect("shrink the file");
    assert_eq!(data.refresh_size().expect("refresh"), NR_BLOCKS + 3);
}
