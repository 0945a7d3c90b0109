//! A fault-injecting metadata device for crash and error tests.
//!
//! It keeps two images: `durable`, what survives a crash for certain, and `current`, what
//! reads see. Writes since the last flush also sit in an ordered pending list, and a crash
//! image is `durable` plus a seeded random subset of that list, some of it torn at sector
//! granularity: the weakest guarantee a disk with a volatile write cache gives.
//!
//! Invariants: an injected failure changes nothing (a failed write is not applied or
//! pending, a failed flush leaves every pending write pending); `current` always equals
//! `durable` with the pending list applied in order; every operation is counted, failed or
//! not, so the counters name crash points reproducibly.

use super::{annotate, out_of_range, MemMetaDevice, MetaBlock, MetaDevice, META_BLOCK_SIZE};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io;

/// Bytes per sector: the unit a torn write is made of.
const SECTOR_SIZE_BYTES: usize = 512;
const SECTORS_PER_BLOCK: usize = META_BLOCK_SIZE / SECTOR_SIZE_BYTES;
const _: () = assert!(SECTORS_PER_BLOCK * SECTOR_SIZE_BYTES == META_BLOCK_SIZE);
// A sector mask is a u8 below.
const _: () = assert!(SECTORS_PER_BLOCK == 8);

/// An error to inject. Counts are relative to when the fault is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Fail the `n`th write from now, once (1 = the next write; 0 is treated as 1).
    NthWrite(u64),
    /// Fail every write to this block.
    WriteToBlock(u64),
    /// Fail the `n`th flush from now, once (1 = the next flush; 0 is treated as 1).
    NthFlush(u64),
    /// Fail every read of this block.
    ReadOfBlock(u64),
    /// Let `n` more operations (reads, writes, flushes) run, then fail every one after.
    AfterOps(u64),
}

/// A fault with its relative count turned into an absolute operation number.
#[derive(Clone, Copy, Debug)]
enum Rule {
    WriteNumber(u64),
    WriteToBlock(u64),
    FlushNumber(u64),
    ReadOfBlock(u64),
    OpsAbove(u64),
}

/// How a crash treats unflushed writes. Probabilities are clamped to [0, 1]; NaN means 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrashConfig {
    /// Chance that an unflushed write reaches the crash image at all.
    pub keep_probability: f64,
    /// Chance that a kept write is torn: only a non-empty proper subset of its sectors lands.
    pub tear_probability: f64,
}

impl Default for CrashConfig {
    fn default() -> Self {
        Self {
            keep_probability: 0.5,
            tear_probability: 0.25,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Default)]
struct State {
    durable: Vec<Box<MetaBlock>>,
    current: Vec<Box<MetaBlock>>,
    /// Unflushed writes in issue order; a block may appear more than once.
    pending: Vec<(u64, Box<MetaBlock>)>,
    /// Each rule with the fault it was made from, which error messages name.
    rules: Vec<(Fault, Rule)>,
    nr_reads: u64,
    nr_writes: u64,
    nr_flushes: u64,
}

impl State {
    fn nr_ops(&self) -> u64 {
        self.nr_reads + self.nr_writes + self.nr_flushes
    }

    /// Counts `op` and returns the injected error if a rule says it fails.
    fn start(&mut self, op: Op, block: Option<u64>) -> io::Result<()> {
        match op {
            Op::Read => self.nr_reads += 1,
            Op::Write => self.nr_writes += 1,
            Op::Flush => self.nr_flushes += 1,
        }
        let nr_ops = self.nr_ops();
        let hit = self.rules.iter().find(|(_, rule)| match *rule {
            Rule::WriteNumber(n) => op == Op::Write && self.nr_writes == n,
            Rule::WriteToBlock(b) => op == Op::Write && block == Some(b),
            Rule::FlushNumber(n) => op == Op::Flush && self.nr_flushes == n,
            Rule::ReadOfBlock(b) => op == Op::Read && block == Some(b),
            Rule::OpsAbove(n) => nr_ops > n,
        });
        match hit {
            None => Ok(()),
            Some((fault, _)) => {
                let what = match block {
                    Some(b) => format!("injected {fault:?} failed {op:?} of metadata block {b}"),
                    None => format!("injected {fault:?} failed {op:?}"),
                };
                Err(annotate(io::Error::from_raw_os_error(libc::EIO), what))
            }
        }
    }
}

/// An in-memory metadata device that can fail on demand and show what a crash would leave.
#[derive(Default)]
pub struct FaultyMetaDevice {
    state: Mutex<State>,
}

/// Summarizes instead of dumping every block, which would bury a failing test's message.
impl std::fmt::Debug for FaultyMetaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock, so formatting from inside a device call cannot deadlock.
        let Some(state) = self.state.try_lock() else {
            return f.write_str("FaultyMetaDevice { <locked> }");
        };
        f.debug_struct("FaultyMetaDevice")
            .field("nr_blocks", &state.current.len())
            .field("nr_pending_writes", &state.pending.len())
            .field(
                "faults",
                &state
                    .rules
                    .iter()
                    .map(|(fault, _)| fault)
                    .collect::<Vec<_>>(),
            )
            .field("nr_reads", &state.nr_reads)
            .field("nr_writes", &state.nr_writes)
            .field("nr_flushes", &state.nr_flushes)
            .finish()
    }
}

impl FaultyMetaDevice {
    /// A zero-filled device of `nr_blocks` blocks, all durable, with no faults.
    pub fn new(nr_blocks: u64) -> Self {
        let dev = Self::default();
        dev.grow(nr_blocks);
        dev
    }

    /// A device whose durable image is a copy of `image`.
    pub fn from_image(image: &MemMetaDevice) -> Self {
        let blocks: Vec<Box<MetaBlock>> = image
            .to_bytes()
            .chunks_exact(META_BLOCK_SIZE)
            .map(|chunk| {
                let mut block = Box::new([0u8; META_BLOCK_SIZE]);
                block.copy_from_slice(chunk);
                block
            })
            .collect();
        let state = State {
            durable: blocks.clone(),
            current: blocks,
            ..State::default()
        };
        Self {
            state: Mutex::new(state),
        }
    }

    /// Grows (never shrinks) the device; new blocks are zero and durable at once, like a
    /// resized underlying device.
    pub fn grow(&self, nr_blocks: u64) {
        let mut state = self.state.lock();
        while (state.current.len() as u64) < nr_blocks {
            state.durable.push(Box::new([0u8; META_BLOCK_SIZE]));
            state.current.push(Box::new([0u8; META_BLOCK_SIZE]));
        }
    }

    /// Adds a fault; it stays until `clear_faults` (the `Nth` ones can fire only once).
    pub fn add_fault(&self, fault: Fault) {
        let mut state = self.state.lock();
        let rule = match fault {
            Fault::NthWrite(n) => Rule::WriteNumber(state.nr_writes.saturating_add(n.max(1))),
            Fault::WriteToBlock(b) => Rule::WriteToBlock(b),
            Fault::NthFlush(n) => Rule::FlushNumber(state.nr_flushes.saturating_add(n.max(1))),
            Fault::ReadOfBlock(b) => Rule::ReadOfBlock(b),
            Fault::AfterOps(n) => Rule::OpsAbove(state.nr_ops().saturating_add(n)),
        };
        state.rules.push((fault, rule));
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.state.lock().rules.clear();
    }

    /// Reads attempted so far, failed ones included.
    pub fn nr_reads(&self) -> u64 {
        self.state.lock().nr_reads
    }

    /// Block writes attempted so far, failed ones included.
    pub fn nr_writes(&self) -> u64 {
        self.state.lock().nr_writes
    }

    /// Flushes attempted so far, failed ones included.
    pub fn nr_flushes(&self) -> u64 {
        self.state.lock().nr_flushes
    }

    /// Writes since the last successful flush.
    pub fn nr_pending_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// What survives a crash for certain: every flushed write and no unflushed one.
    pub fn durable_image(&self) -> MemMetaDevice {
        let state = self.state.lock();
        image_of(&state.durable)
    }

    /// A crash image with the default `CrashConfig`.
    pub fn crash_image(&self, seed: u64) -> MemMetaDevice {
        self.crash_image_with(seed, CrashConfig::default())
    }

    /// What a crash now might leave: the durable image plus a subset of the pending writes,
    /// applied in issue order, some torn. The same seed gives the same image.
    pub fn crash_image_with(&self, seed: u64, config: CrashConfig) -> MemMetaDevice {
        let keep = probability(config.keep_probability);
        let tear = probability(config.tear_probability);
        let mut rng = SmallRng::seed_from_u64(seed);
        let state = self.state.lock();
        let image = image_of(&state.durable);
        for (block, buf) in &state.pending {
            if !rng.gen_bool(keep) {
                continue;
            }
            // A full mask is an untorn write; a torn one lands 1..=7 of the 8 sectors.
            let mask: u8 = if rng.gen_bool(tear) {
                rng.gen_range(1..u8::MAX)
            } else {
                u8::MAX
            };
            for sector in (0..SECTORS_PER_BLOCK).filter(|s| mask & (1 << s) != 0) {
                let start = sector * SECTOR_SIZE_BYTES;
                let bytes = &buf[start..start + SECTOR_SIZE_BYTES];
                // Pending blocks were range-checked on write and devices never shrink.
                let patched = image.patch(*block, start, bytes);
                assert!(
                    patched.is_ok(),
                    "pending write to block {block} is out of range"
                );
            }
        }
        image
    }
}

impl MetaDevice for FaultyMetaDevice {
    fn nr_blocks(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        let mut state = self.state.lock();
        state.start(Op::Read, Some(block))?;
        let nr = state.current.len() as u64;
        let b = usize::try_from(block)
            .ok()
            .and_then(|i| state.current.get(i));
        buf.copy_from_slice(&b.ok_or_else(|| out_of_range(block, nr))?[..]);
        Ok(())
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        let mut state = self.state.lock();
        state.start(Op::Write, Some(block))?;
        let nr = state.current.len() as u64;
        let b = usize::try_from(block)
            .ok()
            .and_then(|i| state.current.get_mut(i));
        b.ok_or_else(|| out_of_range(block, nr))?
            .copy_from_slice(buf);
        state.pending.push((block, Box::new(*buf)));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.start(Op::Flush, None)?;
        let State {
            durable, pending, ..
        } = &mut *state;
        for (block, buf) in pending.drain(..) {
            // Pending blocks were range-checked on write and devices never shrink.
            let slot = usize::try_from(block).ok().and_then(|i| durable.get_mut(i));
            let slot =
                slot.unwrap_or_else(|| panic!("pending write to block {block} is out of range"));
            *slot = buf;
        }
        Ok(())
    }
}

fn image_of(blocks: &[Box<MetaBlock>]) -> MemMetaDevice {
    MemMetaDevice::from_blocks(blocks.to_vec())
}

fn probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}
