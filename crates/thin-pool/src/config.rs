//! Pool options, with dm-thin's defaults where dm-thin has one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::status::PoolEvent;

/// What a write that needs a new data block does when none is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSpacePolicy {
    /// Wait up to `timeout` for space (a grow, or a discard that frees blocks), then fail with
    /// ENOSPC. dm-thin's default (`no_space_timeout`, 60 s).
    Queue { timeout: Duration },
    /// Fail at once with ENOSPC (dm-thin's `error_if_no_space`).
    Error,
}

impl Default for NoSpacePolicy {
    fn default() -> Self {
        NoSpacePolicy::Queue {
            timeout: Duration::from_secs(60),
        }
    }
}

/// How the background zeroes blocks for the reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReserveZeroing {
    /// Write zero buffers. Costs device bandwidth in the background, but leaves nothing for
    /// the first write to pay: on a file, `fallocate(ZERO_RANGE)` turns the range into
    /// unwritten extents and the first write into each then pays the filesystem's extent
    /// conversion (measured 25% slower at QD1 on ext4, `benches/src/bin/pool.rs`).
    #[default]
    WriteZeroes,
    /// The data device's cheapest primitive (`zero_blocks`: ZERO_RANGE on a file,
    /// BLKZEROOUT on a block device): for block devices with offloaded write-zeroes.
    Primitive,
}

/// Called for each pool event, from whichever thread noticed it. Must not block.
pub type EventHook = Arc<dyn Fn(&PoolEvent) + Send + Sync>;

/// Hears of every mapping change before the request that made it is acknowledged, and of
/// every commit, in one sequence: thin `t` has uncommitted changes while the last `changed`
/// seq for it exceeds the last `durable` seq. A daemon that may be killed records these
/// where its successor can read them (shared memory), so that writes acknowledged but never
/// committed are reported, not silently lost. Both must be cheap and must not block.
pub trait ChangeLog: Send + Sync {
    fn changed(&self, thin: u32, seq: u64);
    fn durable(&self, seq: u64);
}

/// How a pool runs.
#[derive(Clone)]
pub struct PoolConfig {
    /// Data blocks kept zeroed ahead of need, so a partial first write never waits for
    /// zeroing. 0 turns the reserve off (every partial first write zeroes synchronously).
    pub reserve_blocks: u64,
    /// Most blocks the background zeroes in one go (one contiguous zeroing call when the
    /// allocator hands out a run). While requests are in flight it refills only a reserve
    /// below half its target, a quarter of this at a time.
    pub reserve_refill_batch: u64,
    /// How reserve blocks are zeroed.
    pub reserve_zeroing: ReserveZeroing,
    /// Pause between refill batches while requests are in flight, so that background zeroing
    /// takes a bounded share of the device.
    pub reserve_busy_pause: Duration,
    /// Free data blocks below which a `LowWaterMark` event fires (once, until space grows
    /// above it again).
    pub low_water_mark_blocks: u64,
    /// See `NoSpacePolicy`.
    pub no_space: NoSpacePolicy,
    /// Commit at least this often while anything changed (dm-thin: 1 s).
    pub commit_interval: Duration,
    /// Pass discards down to the data device when a block's last reference goes.
    pub discard_passdown: bool,
    /// Whole blocks one discard step unmaps under one range lock before yielding.
    pub discard_batch_blocks: u64,
    /// Mappings the background removes per step when freeing a deleted thin.
    pub delete_batch_blocks: u64,
    /// Called for each event (besides the `tracing` line each one gets).
    pub on_event: Option<EventHook>,
    /// See `ChangeLog`.
    pub change_log: Option<Arc<dyn ChangeLog>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            reserve_blocks: 64,
            reserve_refill_batch: 16,
            reserve_zeroing: ReserveZeroing::default(),
            reserve_busy_pause: Duration::from_millis(2),
            low_water_mark_blocks: 0,
            no_space: NoSpacePolicy::default(),
            commit_interval: Duration::from_secs(1),
            discard_passdown: true,
            discard_batch_blocks: 256,
            delete_batch_blocks: 4096,
            on_event: None,
            change_log: None,
        }
    }
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("reserve_blocks", &self.reserve_blocks)
            .field("reserve_refill_batch", &self.reserve_refill_batch)
            .field("reserve_zeroing", &self.reserve_zeroing)
            .field("reserve_busy_pause", &self.reserve_busy_pause)
            .field("low_water_mark_blocks", &self.low_water_mark_blocks)
            .field("no_space", &self.no_space)
            .field("commit_interval", &self.commit_interval)
            .field("discard_passdown", &self.discard_passdown)
            .field("discard_batch_blocks", &self.discard_batch_blocks)
            .field("delete_batch_blocks", &self.delete_batch_blocks)
            .field("on_event", &self.on_event.as_ref().map(|_| "<hook>"))
            .field("change_log", &self.change_log.as_ref().map(|_| "<log>"))
            .finish()
    }
}

impl PoolConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str| Err(crate::PoolError::Invalid(what.to_string()));
        if self.reserve_refill_batch == 0 {
            return bad("reserve_refill_batch must be at least 1");
        }
        if self.discard_batch_blocks == 0 || self.delete_batch_blocks == 0 {
            return bad("discard_batch_blocks and delete_batch_blocks must be at least 1");
        }
        if self.commit_interval.is_zero() {
            return bad("commit_interval must be positive");
        }
        Ok(())
    }
}
