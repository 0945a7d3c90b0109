//! Shared pieces of the data-device tests: scratch files on a real filesystem (O_DIRECT does
//! not work on tmpfs), every engine behind one constructor, and the byte-model conformance run.
//!
//! Randomized runs take their seed from `DATA_SEED` when set and print it on failure.

#![allow(dead_code, reason = "each test crate uses a different subset")]

use block_io::data::rt::RingConfig;
use block_io::data::{
    AnyDataDevice, DataBlock, DataDevice, DataDeviceOptions, DataGeometry, DirectIo, EngineChoice,
    EngineKind, FaultyDataDevice, IoBuf, Limits, MemDataDevice, Prealloc, SyncMode,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const BLOCK_SIZE: u64 = 64 * 1024;
pub const NR_BLOCKS: u64 = 32;

/// A file removed on drop.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh path under the target directory (a disk filesystem, unlike /tmp on many hosts).
pub fn scratch(name: &str) -> Scratch {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("block-io-data");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    Scratch(path)
}

/// The seed for a randomized test: `DATA_SEED` or `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("DATA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Every engine the conformance suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring on the standalone ring.
    Uring,
    /// io_uring on a 2-entry ring, so full submission queues are exercised.
    UringTinyRing,
    /// pread/pwrite on a thread pool.
    SyncPool,
    /// pread/pwrite inline.
    SyncInline,
    /// Auto with io_uring setup forced to fail (the fallback path end to end).
    ForcedFallback,
    Memory,
    Faulty,
}

pub const ALL_ENGINES: [Engine; 7] = [
    Engine::Uring,
    Engine::UringTinyRing,
    Engine::SyncPool,
    Engine::SyncInline,
    Engine::ForcedFallback,
    Engine::Memory,
    Engine::Faulty,
];

/// Opens `engine` over a new `NR_BLOCKS` x `BLOCK_SIZE` device. File engines keep their file
/// alive through the returned guard.
pub fn open_engine(engine: Engine, limits: Limits) -> (AnyDataDevice, Option<Scratch>) {
    let memory_geometry = DataGeometry::new(BLOCK_SIZE, NR_BLOCKS, 512).unwrap();
    let (choice, ring, sync_mode) = match engine {
        Engine::Memory => {
            return (
                AnyDataDevice::Memory(MemDataDevice::new(memory_geometry)),
                None,
            )
        }
        Engine::Faulty => {
            return (
                AnyDataDevice::Faulty(FaultyDataDevice::new(memory_geometry)),
                None,
            )
        }
        Engine::Uring => (
            EngineChoice::Uring,
            RingConfig::default(),
            SyncMode::default(),
        ),
        Engine::UringTinyRing => (
            EngineChoice::Uring,
            RingConfig {
                sq_entries: 2,
                ..RingConfig::default()
            },
            SyncMode::default(),
        ),
        Engine::SyncPool => (
            EngineChoice::Sync,
            RingConfig::default(),
            SyncMode::default(),
        ),
        Engine::SyncInline => (EngineChoice::Sync, RingConfig::default(), SyncMode::Inline),
        Engine::ForcedFallback => (
            EngineChoice::Auto,
            RingConfig {
                fail_setup_with: Some(libc::EPERM),
                ..RingConfig::default()
            },
            SyncMode::default(),
        ),
    };
    let file = scratch(&format!("{engine:?}").to_lowercase());
    let dev = DataDeviceOptions::new(BLOCK_SIZE)
        .engine(choice)
        .ring(ring)
        .sync_mode(sync_mode)
        .limits(limits)
        .direct(DirectIo::Auto)
        .on_warning(|_| {})
        .create(&file.0, NR_BLOCKS, Prealloc::Allocate)
        .unwrap_or_else(|e| panic!("opening {engine:?}: {e}"));
    let expected = match engine {
        Engine::Uring | Engine::UringTinyRing => EngineKind::Uring,
        _ => EngineKind::Sync,
    };
    assert_eq!(dev.kind(), expected, "{engine:?}");
    (dev, Some(file))
}

/// Per 512-byte sector: exactly `bytes`, or (after a discard) `bytes` or all zeros.
pub struct Model {
    pub bytes: Vec<u8>,
    pub exact: Vec<bool>,
}

const SECTOR: usize = 512;

impl Model {
    pub fn new(len: usize) -> Self {
        Self {
            bytes: vec![0; len],
            exact: vec![true; len / SECTOR],
        }
    }

    fn set(&mut self, pos: usize, data: &[u8]) {
        self.bytes[pos..pos + data.len()].copy_from_slice(data);
        self.exact[pos / SECTOR..(pos + data.len()) / SECTOR].fill(true);
    }

    /// Checks `got`, read at `pos`, against the model.
    pub fn check(&self, pos: usize, got: &[u8], ctx: &dyn Fn() -> String) {
        for (i, chunk) in got.chunks(SECTOR).enumerate() {
            let at = pos + i * SECTOR;
            let want = &self.bytes[at..at + chunk.len()];
            let ok = chunk == want || (!self.exact[at / SECTOR] && chunk.iter().all(|&b| b == 0));
            assert!(
                ok,
                "byte mismatch in sector at device offset {at}: {}",
                ctx()
            );
        }
    }
}

fn aligned_range(rng: &mut SmallRng, align: u64, max_len: u64) -> (u64, u64) {
    let units = BLOCK_SIZE / align;
    let start = rng.gen_range(0..units);
    let max_units = (units - start).min(max_len / align).max(1);
    let len = rng.gen_range(1..=max_units);
    (start * align, len * align)
}

fn random_buf(rng: &mut SmallRng, len: usize) -> IoBuf {
    let mut buf = IoBuf::new(len);
    rng.fill(&mut buf[..]);
    buf
}

fn expect_invalid(res: io::Result<()>, what: &str, ctx: &dyn Fn() -> String) {
    match res {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
        other => panic!("{what}: expected InvalidInput, got {other:?}: {}", ctx()),
    }
}

/// Seeded random reads, writes, zeroes, copies, discards and flushes from `nr_workers`
/// concurrent workers (worker `w` owns the blocks `b % nr_workers == w`), checked against a
/// byte model; then every byte is read back and checked.
pub async fn run_model<D: DataDevice>(dev: &D, seed: u64, nr_workers: u64, nr_ops: u64) {
    let geometry = dev.geometry();
    assert_eq!(geometry.block_size_bytes, BLOCK_SIZE);
    assert_eq!(geometry.nr_blocks, NR_BLOCKS);
    let align = geometry.align_bytes;
    let model = RefCell::new(Model::new((BLOCK_SIZE * NR_BLOCKS) as usize));
    let bs = BLOCK_SIZE as usize;

    let worker = |w: u64| {
        let model = &model;
        async move {
            let mut rng = SmallRng::seed_from_u64(seed ^ (w.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let owned: Vec<u64> = (0..NR_BLOCKS).filter(|b| b % nr_workers == w).collect();
            for i in 0..nr_ops {
                let ctx =
                    || format!("seed {seed} (replay with DATA_SEED={seed}), worker {w}, op {i}");
                let block = owned[rng.gen_range(0..owned.len())];
                let base = block as usize * bs;
                match rng.gen_range(0..100) {
                    0..30 => {
                        let (off, len) = aligned_range(&mut rng, align, 16 * 1024);
                        let buf = random_buf(&mut rng, len as usize);
                        let (res, buf) = dev.write(DataBlock(block), off, buf).await;
                        res.unwrap_or_else(|e| panic!("write: {e}: {}", ctx()));
                        model.borrow_mut().set(base + off as usize, &buf);
                    }
                    30..60 => {
                        let (off, len) = aligned_range(&mut rng, align, 32 * 1024);
                        let buf = IoBuf::filled(len as usize, 0xee);
                        let (res, buf) = dev.read(DataBlock(block), off, buf).await;
                        res.unwrap_or_else(|e| panic!("read: {e}: {}", ctx()));
                        assert_eq!(buf.len(), len as usize);
                        model.borrow().check(base + off as usize, &buf, &ctx);
                    }
                    60..65 => {
                        let nr = rng.gen_range(1..=4usize);
                        let bufs: Vec<IoBuf> = (0..nr)
                            .map(|_| random_buf(&mut rng, align as usize * 2))
                            .collect();
                        let total = nr as u64 * align * 2;
                        let off = rng.gen_range(0..=(BLOCK_SIZE - total) / align) * align;
                        let (res, bufs) = dev.write_vectored(DataBlock(block), off, bufs).await;
                        res.unwrap_or_else(|e| panic!("write_vectored: {e}: {}", ctx()));
                        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                        model.borrow_mut().set(base + off as usize, &joined);
                    }
                    65..70 => {
                        let nr = rng.gen_range(1..=4usize);
                        let bufs: Vec<IoBuf> = (0..nr)
                            .map(|_| IoBuf::filled(align as usize, 0xdd))
                            .collect();
                        let total = nr as u64 * align;
                        let off = rng.gen_range(0..=(BLOCK_SIZE - total) / align) * align;
                        let (res, bufs) = dev.read_vectored(DataBlock(block), off, bufs).await;
                        res.unwrap_or_else(|e| panic!("read_vectored: {e}: {}", ctx()));
                        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                        model.borrow().check(base + off as usize, &joined, &ctx);
                    }
                    70..75 => {
                        dev.zero_blocks(DataBlock(block), 1)
                            .await
                            .unwrap_or_else(|e| panic!("zero: {e}: {}", ctx()));
                        model.borrow_mut().set(base, &vec![0; bs]);
                    }
                    75..83 => {
                        let to = owned[rng.gen_range(0..owned.len())];
                        let res = dev.copy_block(DataBlock(block), DataBlock(to)).await;
                        if to == block {
                            expect_invalid(res, "copy onto itself", &ctx);
                            continue;
                        }
                        res.unwrap_or_else(|e| panic!("copy: {e}: {}", ctx()));
                        let mut m = model.borrow_mut();
                        let dst = to as usize * bs;
                        m.bytes.copy_within(base..base + bs, dst);
                        let s = SECTOR;
                        m.exact.copy_within(base / s..(base + bs) / s, dst / s);
                    }
                    83..88 => {
                        dev.discard_blocks(DataBlock(block), 1)
                            .await
                            .unwrap_or_else(|e| panic!("discard: {e}: {}", ctx()));
                        let mut m = model.borrow_mut();
                        m.exact[base / SECTOR..(base + bs) / SECTOR].fill(false);
                    }
                    88..93 => {
                        dev.flush()
                            .await
                            .unwrap_or_else(|e| panic!("flush: {e}: {}", ctx()));
                    }
                    _ => {
                        // Requests every engine must refuse, handing the buffer back.
                        let (res, buf) =
                            dev.read(DataBlock(block), align / 2, IoBuf::new(512)).await;
                        assert_eq!(buf.len(), 512);
                        expect_invalid(res, "misaligned offset", &ctx);
                        let (res, _) = dev.write(DataBlock(block), 0, IoBuf::new(100)).await;
                        expect_invalid(res, "misaligned length", &ctx);
                        let (res, _) = dev
                            .read(
                                DataBlock(block),
                                BLOCK_SIZE - align,
                                IoBuf::new(2 * align as usize),
                            )
                            .await;
                        expect_invalid(res, "crossing the block end", &ctx);
                        let (res, _) = dev.write(DataBlock(NR_BLOCKS), 0, IoBuf::new(512)).await;
                        expect_invalid(res, "past the device end", &ctx);
                        let res = dev
                            .zero_blocks(DataBlock(NR_BLOCKS - 1), 2)
                            .await
                            .map(|_| ());
                        expect_invalid(res, "zero past the end", &ctx);
                        let res = dev.copy_block(DataBlock(block), DataBlock(NR_BLOCKS)).await;
                        expect_invalid(res, "copy past the end", &ctx);
                    }
                }
            }
        }
    };
    block_io::data::rt::join_all((0..nr_workers).map(worker)).await;

    dev.flush().await.expect("final flush");
    for block in 0..NR_BLOCKS {
        let (res, buf) = dev.read(DataBlock(block), 0, IoBuf::new(bs)).await;
        res.expect("final read");
        let ctx = || format!("final check of block {block}, seed {seed}");
        model.borrow().check(block as usize * bs, &buf, &ctx);
    }
}
