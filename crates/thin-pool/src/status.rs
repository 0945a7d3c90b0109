//! Modes, events, counters and the status report.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The pool's mode, as dm-thin reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Normal operation.
    Write,
    /// No free data block: writes that need one queue or fail; everything else goes on.
    OutOfDataSpace,
    /// Latched after a metadata error: reads go on, writes and changes get EIO.
    ReadOnly,
    /// Every request fails (the metadata could not even be reloaded).
    Fail,
}

impl PoolMode {
    pub(crate) fn from_u8(v: u8) -> PoolMode {
        match v {
            0 => PoolMode::Write,
            1 => PoolMode::OutOfDataSpace,
            2 => PoolMode::ReadOnly,
            _ => PoolMode::Fail,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            PoolMode::Write => 0,
            PoolMode::OutOfDataSpace => 1,
            PoolMode::ReadOnly => 2,
            PoolMode::Fail => 3,
        }
    }

    /// dm-thin's status word for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Write => "rw",
            PoolMode::OutOfDataSpace => "out_of_data_space",
            PoolMode::ReadOnly => "ro",
            PoolMode::Fail => "fail",
        }
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something an operator should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// Free data blocks fell below the low water mark.
    LowWaterMark { free_blocks: u64, mark: u64 },
    /// The mode changed.
    ModeChanged {
        from: PoolMode,
        to: PoolMode,
        why: String,
    },
    /// Metadata space is down to its reserve: new provisioning gets ENOSPC.
    MetadataLow { free_blocks: u64 },
}

/// Commit latency histogram: bucket i counts commits under 2^i microseconds.
const LATENCY_BUCKETS: usize = 32;

/// Event counters, each monotonic. Read with `snapshot`.
#[derive(Debug)]
pub(crate) struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub discards: AtomicU64,
    pub flushes: AtomicU64,
    /// Blocks provisioned for writes covering the whole block (no zeroing needed).
    pub provisions_full: AtomicU64,
    /// Blocks provisioned from the pre-zeroed reserve.
    pub provisions_reserve: AtomicU64,
    /// Blocks provisioned with a synchronous zeroing because the reserve was empty.
    pub provisions_sync_zero: AtomicU64,
    /// Blocks the background zeroed into the reserve.
    pub background_zeroed: AtomicU64,
    /// Sharing broken with a copy, and without one (the write covered the block).
    pub copies: AtomicU64,
    pub breaks_full: AtomicU64,
    /// Writes of zeros to unprovisioned blocks that allocated nothing.
    pub zero_writes_elided: AtomicU64,
    pub blocks_discarded: AtomicU64,
    pub blocks_passed_down: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub commit_us_total: AtomicU64,
    pub commit_us_max: AtomicU64,
    commit_hist: [AtomicU64; LATENCY_BUCKETS],
    pub no_space_waits: AtomicU64,
    pub no_space_errors: AtomicU64,
    pub upgrade_races: AtomicU64,
    /// Batches the worker ran to free deleted thins.
    pub delete_steps: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            provisions_full: AtomicU64::new(0),
            provisions_reserve: AtomicU64::new(0),
            provisions_sync_zero: AtomicU64::new(0),
            background_zeroed: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            breaks_full: AtomicU64::new(0),
            zero_writes_elided: AtomicU64::new(0),
            blocks_discarded: AtomicU64::new(0),
            blocks_passed_down: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            commit_us_total: AtomicU64::new(0),
            commit_us_max: AtomicU64::new(0),
            commit_hist: std::array::from_fn(|_| AtomicU64::new(0)),
            no_space_waits: AtomicU64::new(0),
            no_space_errors: AtomicU64::new(0),
            upgrade_races: AtomicU64::new(0),
            delete_steps: AtomicU64::new(0),
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Counters {
    pub fn record_commit(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        bump(&self.commits);
        self.commit_us_total.fetch_add(us, Relaxed);
        self.commit_us_max.fetch_max(us, Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        bump(&self.commit_hist[bucket]);
    }

    /// The upper bound of the bucket holding the 99th percentile commit, in microseconds.
    fn commit_p99_us(&self) -> u64 {
        let counts: Vec<u64> = self.commit_hist.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = total - total / 100;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << i;
            }
        }
        u64::MAX
    }

    pub fn snapshot(&self) -> PoolStats {
        let l = |c: &AtomicU64| c.load(Relaxed);
        PoolStats {
            reads: l(&self.reads),
            writes: l(&self.writes),
            discards: l(&self.discards),
            flushes: l(&self.flushes),
            provisions_full: l(&self.provisions_full),
            provisions_reserve: l(&self.provisions_reserve),
            provisions_sync_zero: l(&self.provisions_sync_zero),
            background_zeroed: l(&self.background_zeroed),
            copies: l(&self.copies),
            breaks_full: l(&self.breaks_full),
            zero_writes_elided: l(&self.zero_writes_elided),
            blocks_discarded: l(&self.blocks_discarded),
            blocks_passed_down: l(&self.blocks_passed_down),
            commits: l(&self.commits),
            commit_failures: l(&self.commit_failures),
            commit_avg_us: l(&self.commit_us_total)
                .checked_div(l(&self.commits))
                .unwrap_or(0),
            commit_max_us: l(&self.commit_us_max),
            commit_p99_us: self.commit_p99_us(),
            no_space_waits: l(&self.no_space_waits),
            no_space_errors: l(&self.no_space_errors),
            upgrade_races: l(&self.upgrade_races),
            delete_steps: l(&self.delete_steps),
        }
    }
}

/// Pool-wide counters since the pool was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub flushes: u64,
    /// Provisions for writes covering the whole block: no zeroing needed.
    pub provisions_full: u64,
    /// Provisions served pre-zeroed from the reserve.
    pub provisions_reserve: u64,
    /// Provisions that zeroed synchronously because the reserve was empty.
    pub provisions_sync_zero: u64,
    /// Blocks the background zeroed for the reserve.
    pub background_zeroed: u64,
    /// Sharing broken by copying the old block.
    pub copies: u64,
    /// Sharing broken without a copy (the write covered the block).
    pub breaks_full: u64,
    /// Zero writes to unprovisioned blocks that allocated nothing.
    pub zero_writes_elided: u64,
    pub blocks_discarded: u64,
    pub blocks_passed_down: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub commit_avg_us: u64,
    pub commit_max_us: u64,
    /// Upper bound of the histogram bucket holding the 99th percentile.
    pub commit_p99_us: u64,
    pub no_space_waits: u64,
    pub no_space_errors: u64,
    pub upgrade_races: u64,
    /// Batches run to free deleted thins (each holds the metadata lock briefly).
    pub delete_steps: u64,
}

/// Per-thin counters.
#[derive(Debug, Default)]
pub(crate) struct ThinCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub provisions: AtomicU64,
    pub copies: AtomicU64,
    pub blocks_discarded: AtomicU64,
}

/// One thin in the status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinStatus {
    pub id: u32,
    pub mapped_blocks: u64,
    /// Open handles (an exposed device holds one).
    pub open_count: usize,
    pub reads: u64,
    pub writes: u64,
    pub provisions: u64,
    pub copies: u64,
    pub blocks_discarded: u64,
}

/// What `Pool::status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub mode: PoolMode,
    /// Why the pool left write mode, if it did.
    pub mode_reason: Option<String>,
    pub transaction_id: u64,
    pub data_block_size_bytes: u64,
    pub nr_data_blocks: u64,
    /// Blocks mapped by thins (the reserve and blocks of deleted thins not yet freed excluded).
    pub used_data_blocks: u64,
    pub free_data_blocks: u64,
    /// Zeroed blocks ready for partial first writes, and the target.
    pub reserve_ready: u64,
    pub reserve_target: u64,
    /// Blocks still held by deleted thins that the background is freeing.
    pub deleting_blocks: u64,
    pub nr_metadata_blocks: u64,
    pub free_metadata_blocks: u64,
    pub metadata_reserve_blocks: u64,
    pub low_water_mark_blocks: u64,
    pub needs_check: bool,
    pub held_metadata_root: Option<u64>,
    pub stats: PoolStats,
    pub thins: Vec<ThinStatus>,
}
