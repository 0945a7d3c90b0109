//! A fault-injecting data device for error, latency and crash tests, in memory.
//!
//! Like `meta::FaultyMetaDevice`, it keeps `durable` (what survives a crash for certain) and
//! `current` (what reads see), plus an ordered log of the writes since the last flush. Zeroes,
//! discards and copies are logged as the writes of the bytes they produce. A crash image is
//! `durable` plus a seeded random subset of the log applied in order, some entries torn at
//! 512-byte sector granularity: the weakest promise a disk with a volatile cache makes.
//!
//! Latency is injected with `rt::sleep`, so it needs `rt::block_on` on the calling thread.
//!
//! Invariants: an injected failure changes nothing (it is decided before any byte moves, and a
//! failed flush leaves the log as it was); `current` always equals `durable` with the log
//! applied; every operation is counted, failed or not, so counters name crash points
//! reproducibly; the log is bounded by `MAX_PENDING_BYTES`.

use super::rt::sleep;
use super::{
    check_copy, BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, IoBuf, MemDataDevice,
    Primitive,
};
use crate::meta::CrashConfig;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::time::Duration;

/// Sector size: the unit a torn write is made of.
const SECTOR_SIZE_BYTES: usize = 512;
/// Most bytes of unflushed writes the log holds; more fails with ENOMEM until a flush.
pub(crate) const MAX_PENDING_BYTES: usize = 256 << 20;

/// Kinds of data operation, for faults, latency and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataOp {
    /// `read` and `read_vectored`.
    Read,
    /// `write` and `write_vectored`.
    Write,
    /// `zero_blocks`.
    Zero,
    /// `copy_block`.
    Copy,
    /// `discard_blocks`.
    Discard,
    /// `flush`.
    Flush,
}

const NR_OPS: usize = 6;

impl DataOp {
    fn index(self) -> usize {
        self as usize
    }
}

/// An error to inject (EIO). Counts are relative to when the fault is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataFault {
    /// Fail the `n`th operation of this kind from now, once (0 is treated as 1).
    Nth(DataOp, u64),
    /// Fail every operation of this kind that touches this data block.
    OnBlock(DataOp, u64),
    /// Let `n` more operations of any kind run, then fail every one after.
    AfterOps(u64),
}

/// Data blocks `first..end` an operation touches.
#[derive(Clone, Copy, Debug)]
struct Span {
    first: u64,
    end: u64,
}

impl Span {
    fn blocks(first: u64, nr_blocks: u64) -> Self {
        Self {
            first,
            end: first.saturating_add(nr_blocks),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Rule {
    Number(DataOp, u64),
    OnBlock(DataOp, u64),
    OpsAbove(u64),
}

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<(usize, Vec<u8>)>,
    nr_pending_bytes: usize,
    rules: Vec<(DataFault, Rule)>,
    counts: [u64; NR_OPS],
    latency: [Duration; NR_OPS],
}

impl State {
    fn nr_ops(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts `op` over the block ranges `spans` and returns the injected error if a rule hits.
    fn start(&mut self, op: DataOp, spans: &[Span]) -> io::Result<()> {
        self.counts[op.index()] += 1;
        let nr_ops = self.nr_ops();
        let count = self.counts[op.index()];
        let hit = self.rules.iter().find(|(_, rule)| match *rule {
            Rule::Number(o, n) => o == op && count == n,
            Rule::OnBlock(o, b) => o == op && spans.iter().any(|s| s.first <= b && b < s.end),
            Rule::OpsAbove(n) => nr_ops > n,
        });
        match hit {
            None => Ok(()),
            Some((fault, _)) => Err(crate::meta::annotate(
                io::Error::from_raw_os_error(libc::EIO),
                format!("injected {fault:?} failed {op:?} of data blocks {spans:?}"),
            )),
        }
    }

    /// Applies a write of `bytes` at `pos` and logs it.
    fn apply(&mut self, pos: usize, bytes: &[u8]) -> io::Result<()> {
        if self.nr_pending_bytes + bytes.len() > MAX_PENDING_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "fault-injecting data device holds {MAX_PENDING_BYTES} bytes of unflushed \
                     writes: flush more often"
                ),
            ));
        }
        self.current[pos..pos + bytes.len()].copy_from_slice(bytes);
        self.pending.push((pos, bytes.to_vec()));
        self.nr_pending_bytes += bytes.len();
        Ok(())
    }
}

/// An in-memory data device that fails, slows down and crashes on demand.
pub struct FaultyDataDevice {
    geometry: DataGeometry,
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultyDataDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(state) = self.state.try_lock() else {
            return f.write_str("FaultyDataDevice { <locked> }");
        };
        f.debug_struct("FaultyDataDevice")
            .field("geometry", &self.geometry)
            .field("nr_pending_writes", &state.pending.len())
            .field(
                "faults",
                &state.rules.iter().map(|(f, _)| f).collect::<Vec<_>>(),
            )
            .field("counts", &state.counts)
            .finish()
    }
}

impl FaultyDataDevice {
    /// A zero-filled device, all durable, with no faults.
    pub fn new(geometry: DataGeometry) -> Self {
        let len = usize::try_from(geometry.len_bytes()).unwrap_or(usize::MAX);
        Self::with_image(geometry, vec![0; len])
    }

    /// A device whose durable image is a copy of `image` (same geometry).
    pub fn from_image(image: &MemDataDevice) -> Self {
        Self::with_image(image.geometry(), image.to_bytes())
    }

    fn with_image(geometry: DataGeometry, bytes: Vec<u8>) -> Self {
        Self {
            geometry,
            state: Mutex::new(State {
                durable: bytes.clone(),
                current: bytes,
                ..State::default()
            }),
        }
    }

    /// Adds a fault; it stays until `clear_faults` (`Nth` fires once).
    pub fn add_fault(&self, fault: DataFault) {
        let mut state = self.state.lock();
        let rule = match fault {
            DataFault::Nth(op, n) => {
                Rule::Number(op, state.counts[op.index()].saturating_add(n.max(1)))
            }
            DataFault::OnBlock(op, b) => Rule::OnBlock(op, b),
            DataFault::AfterOps(n) => Rule::OpsAbove(state.nr_ops().saturating_add(n)),
        };
        state.rules.push((fault, rule));
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state.lock().rules.clear();
    }

    /// Delays every operation of kind `op` by `latency` (zero to stop).
    pub fn set_latency(&self, op: DataOp, latency: Duration) {
        self.state.lock().latency[op.index()] = latency;
    }

    /// Operations of kind `op` attempted so far, failed ones included.
    pub fn nr_ops(&self, op: DataOp) -> u64 {
        self.state.lock().counts[op.index()]
    }

    /// Writes (of any kind) since the last successful flush.
    pub fn nr_pending_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// What survives a crash for certain: every flushed write and no unflushed one.
    pub fn durable_image(&self) -> MemDataDevice {
        let bytes = self.state.lock().durable.clone();
        self.image(bytes)
    }

    /// A crash image with the default `CrashConfig`.
    pub fn crash_image(&self, seed: u64) -> MemDataDevice {
        self.crash_image_with(seed, CrashConfig::default())
    }

    /// What a crash now might leave: the durable image plus a seeded subset of the unflushed
    /// writes, applied in order, some torn at sector granularity.
    pub fn crash_image_with(&self, seed: u64, config: CrashConfig) -> MemDataDevice {
        let keep = probability(config.keep_probability);
        let tear = probability(config.tear_probability);
        let mut rng = SmallRng::seed_from_u64(seed);
        let state = self.state.lock();
        let mut bytes = state.durable.clone();
        for (pos, data) in &state.pending {
            if !rng.gen_bool(keep) {
                continue;
            }
            let nr_sectors = data.len().div_ceil(SECTOR_SIZE_BYTES);
            let mut mask: Vec<bool> = vec![true; nr_sectors];
            if nr_sectors > 1 && rng.gen_bool(tear) {
                // A non-empty proper subset of the sectors lands.
                mask.iter_mut().for_each(|m| *m = rng.gen_bool(0.5));
                let i = rng.gen_range(0..nr_sectors);
                if mask.iter().all(|&m| m) {
                    mask[i] = false;
                } else if !mask.iter().any(|&m| m) {
                    mask[i] = true;
                }
            }
            for (sector, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
                let start = sector * SECTOR_SIZE_BYTES;
                let end = (start + SECTOR_SIZE_BYTES).min(data.len());
                bytes[pos + start..pos + end].copy_from_slice(&data[start..end]);
            }
        }
        drop(state);
        self.image(bytes)
    }

    fn image(&self, bytes: Vec<u8>) -> MemDataDevice {
        match MemDataDevice::from_bytes(self.geometry, bytes) {
            Ok(image) => image,
            // Unreachable: both images are always exactly the geometry's size.
            Err(e) => panic!("fault device image: {e}"),
        }
    }

    /// Counts the op, waits its latency, and fails it if a rule says so.
    async fn start(&self, op: DataOp, spans: &[Span]) -> io::Result<()> {
        let (res, latency) = {
            let mut state = self.state.lock();
            (state.start(op, spans), state.latency[op.index()])
        };
        if !latency.is_zero() {
            sleep(latency).await;
        }
        res
    }

    fn span(block: DataBlock) -> [Span; 1] {
        [Span::blocks(block.0, 1)]
    }
}

impl DataDevice for FaultyDataDevice {
    fn geometry(&self) -> DataGeometry {
        self.geometry
    }

    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        let mut buf = buf;
        let pos = match self
            .geometry
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(pos) => pos as usize,
            Err(e) => return (Err(e), buf),
        };
        if let Err(e) = self.start(DataOp::Read, &Self::span(block)).await {
            return (Err(e), buf);
        }
        let len = buf.len();
        buf.copy_from_slice(&self.state.lock().current[pos..pos + len]);
        (Ok(()), buf)
    }

    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        let pos = match self
            .geometry
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(pos) => pos as usize,
            Err(e) => return (Err(e), buf),
        };
        if let Err(e) = self.start(DataOp::Write, &Self::span(block)).await {
            return (Err(e), buf);
        }
        let res = self.state.lock().apply(pos, &buf);
        (res, buf)
    }

    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        let mut bufs = bufs;
        let mut pos = match self.geometry.check_iovecs(block, offset_bytes, &bufs) {
            Ok(pos) => pos as usize,
            Err(e) => return (Err(e), bufs),
        };
        if let Err(e) = self.start(DataOp::Read, &Self::span(block)).await {
            return (Err(e), bufs);
        }
        let state = self.state.lock();
        for buf in &mut bufs {
            let len = buf.len();
            buf.copy_from_slice(&state.current[pos..pos + len]);
            pos += len;
        }
        drop(state);
        (Ok(()), bufs)
    }

    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        let pos = match self.geometry.check_iovecs(block, offset_bytes, &bufs) {
            Ok(pos) => pos as usize,
            Err(e) => return (Err(e), bufs),
        };
        if let Err(e) = self.start(DataOp::Write, &Self::span(block)).await {
            return (Err(e), bufs);
        }
        // One log entry, as the kernel may tear a vectored write anywhere too.
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let res = self.state.lock().apply(pos, &joined);
        (res, bufs)
    }

    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry.check_blocks(first, nr_blocks)?;
        self.start(DataOp::Zero, &[Span::blocks(first.0, nr_blocks)])
            .await?;
        self.state
            .lock()
            .apply(offset as usize, &vec![0; len as usize])?;
        Ok(Primitive::Memory)
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        check_copy(&self.geometry, from, to)?;
        // A rule on either block hits a copy.
        self.start(
            DataOp::Copy,
            &[Span::blocks(from.0, 1), Span::blocks(to.0, 1)],
        )
        .await?;
        let bs = self.geometry.block_size_bytes as usize;
        let mut state = self.state.lock();
        let src = from.0 as usize * bs;
        let data = state.current[src..src + bs].to_vec();
        state.apply(to.0 as usize * bs, &data)
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry.check_blocks(first, nr_blocks)?;
        self.start(DataOp::Discard, &[Span::blocks(first.0, nr_blocks)])
            .await?;
        self.state
            .lock()
            .apply(offset as usize, &vec![0; len as usize])?;
        Ok(Primitive::Memory)
    }

    async fn flush(&self) -> io::Result<()> {
        self.start(DataOp::Flush, &[]).await?;
        let mut state = self.state.lock();
        let State {
            durable,
            pending,
            nr_pending_bytes,
            ..
        } = &mut *state;
        for (pos, data) in pending.drain(..) {
            durable[pos..pos + data.len()].copy_from_slice(&data);
        }
        *nr_pending_bytes = 0;
        Ok(())
    }
}

fn probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}
