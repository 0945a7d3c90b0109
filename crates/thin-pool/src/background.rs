//! The worker thread: keeps the reserve zeroed and frees deleted thins, in bounded steps.
//!
//! Each step is small (one refill batch, one batch of removed mappings) and, while requests
//! are in flight, followed by a pause (`reserve_busy_pause`), so background work takes a
//! bounded share of the devices and of the metadata lock. When idle it runs steps back to back.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bio_prison::{ExclusiveGuard, Key, Level};
use block_io::data::{rt, DataDevice, IoBuf};
use thin_metadata::{DataBlock, Space, ThinId, VBlock};

use crate::config::ReserveZeroing;
use crate::pool::{DeviceFactory, Shared};
use crate::reserve::{FIRST_TRASH_ID, RESERVE_THIN};
use crate::status::PoolMode;

/// How long the worker sleeps when nobody kicks it.
const IDLE_WAIT: Duration = Duration::from_millis(200);

pub(crate) fn run<B: DataDevice>(shared: &Shared, make_device: &dyn DeviceFactory<B>) {
    let open = || match make_device() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!("cannot open the data device for background work: {e}");
            None
        }
    };
    let mut dev = open();
    let mut grown_seen = shared.data_grown.load(Ordering::SeqCst);
    loop {
        let grown = shared.data_grown.load(Ordering::SeqCst);
        if grown != grown_seen {
            // The data space grew: an open of the device now sees its new size.
            grown_seen = grown;
            dev = open();
        }
        {
            let mut w = shared.worker.lock();
            if !w.kicked && !w.stop {
                shared.worker_cv.wait_for(&mut w, IDLE_WAIT);
            }
            if w.stop {
                return;
            }
            w.kicked = false;
        }
        let Some(dev) = &dev else { continue };
        rt::block_on(async {
            loop {
                if shared.worker.lock().stop {
                    return;
                }
                let did = verify_step(shared, dev).await
                    | refill_step(shared, dev).await
                    | free_deleted_step(shared);
                if !did {
                    return;
                }
                if shared.inflight.load(Ordering::Relaxed) > 0 {
                    rt::sleep(shared.cfg.reserve_busy_pause).await;
                }
            }
        });
    }
}

/// Exclusive data locks on `blocks` (ascending), so zeroing never races a discard passdown
/// still running on a block freed earlier.
async fn lock_blocks<'a>(shared: &'a Shared, blocks: &[DataBlock]) -> Vec<ExclusiveGuard<'a>> {
    let mut sorted: Vec<u64> = blocks.iter().map(|b| b.0).collect();
    sorted.sort_unstable();
    let mut guards = Vec::with_capacity(sorted.len());
    for b in sorted {
        guards.push(
            shared
                .prison
                .exclusive(Key::data(b), Level::ReadWrite)
                .await,
        );
    }
    guards
}

/// Largest zero buffer the background writes at once.
const ZERO_CHUNK: u64 = 256 << 10;

/// Zeroes `blocks` as the configuration says.
async fn zero_blocks<D: DataDevice>(
    shared: &Shared,
    dev: &D,
    blocks: &[DataBlock],
) -> std::io::Result<()> {
    match shared.cfg.reserve_zeroing {
        ReserveZeroing::Primitive => zero_runs(dev, blocks).await,
        ReserveZeroing::WriteZeroes => {
            let bs = shared.geometry.block_size_bytes;
            let chunk = bs.min(ZERO_CHUNK);
            let mut buf = IoBuf::new(chunk as usize);
            for b in blocks {
                let mut off = 0;
                while off < bs {
                    let (r, back) = dev.write(block_io::data::DataBlock(b.0), off, buf).await;
                    r?;
                    // Writes never change the buffer: it stays zero.
                    buf = back;
                    off += chunk;
                }
            }
            Ok(())
        }
    }
}

/// Zeroes `blocks` in runs of consecutive numbers with the device's primitive.
async fn zero_runs<D: DataDevice>(dev: &D, blocks: &[DataBlock]) -> std::io::Result<()> {
    let mut sorted: Vec<u64> = blocks.iter().map(|b| b.0).collect();
    sorted.sort_unstable();
    for (first, n) in crate::thin::runs(&sorted) {
        dev.zero_blocks(block_io::data::DataBlock(first), n).await?;
    }
    Ok(())
}

/// Re-zeroes reserve blocks found at open (see `reserve.rs`).
async fn verify_step<D: DataDevice>(shared: &Shared, dev: &D) -> bool {
    let batch = shared
        .reserve
        .take_unverified(shared.cfg.reserve_refill_batch as usize);
    if batch.is_empty() {
        return false;
    }
    let blocks: Vec<DataBlock> = batch.iter().map(|&(_, b)| b).collect();
    let guards = lock_blocks(shared, &blocks).await;
    let zeroed = zero_blocks(shared, dev, &blocks).await;
    drop(guards);
    match zeroed {
        Ok(()) => shared.reserve.verified(&batch),
        Err(e) => {
            tracing::warn!("re-zeroing reserve blocks failed: {e}; will retry");
            shared.reserve.unverified_again(&batch);
            return false;
        }
    }
    true
}

/// Zeroes one batch of fresh blocks into the reserve if it is below target.
async fn refill_step<D: DataDevice>(shared: &Shared, dev: &D) -> bool {
    if shared.mode() != PoolMode::Write {
        return false;
    }
    let held = shared.reserve.nr_held();
    let target = shared.cfg.reserve_blocks;
    if held >= target || !shared.meta.thins().contains(&RESERVE_THIN) {
        return false;
    }
    let gen = shared.space_gen.load(Ordering::SeqCst);
    if shared.refill_stalled_at.load(Ordering::SeqCst) == gen + 1 {
        return false; // no space since the last try
    }
    // While requests are in flight, refill only a reserve below half its target, in small
    // batches: zeroing then competes with foreground I/O for the device. Idle, refill fully.
    let busy = shared.inflight.load(Ordering::Relaxed) > 0;
    if busy && held >= target.div_ceil(2) {
        return false;
    }
    let batch = match busy {
        true => (shared.cfg.reserve_refill_batch / 4).max(1),
        false => shared.cfg.reserve_refill_batch,
    };
    let n = (target - held).min(batch);
    let first_key = shared.reserve.begin_refill(n);
    let mut blocks = Vec::new();
    for _ in 0..n {
        match shared.meta.claim_data_block() {
            Ok(b) => blocks.push(b),
            Err(thin_metadata::Error::NoSpace(Space::Data)) => {
                shared.refill_stalled_at.store(gen + 1, Ordering::SeqCst);
                break;
            }
            Err(e) => {
                shared.meta_error(e);
                break;
            }
        }
    }
    let guards = lock_blocks(shared, &blocks).await;
    let zeroed = zero_blocks(shared, dev, &blocks).await;
    drop(guards);
    let mut mapped = Vec::new();
    match zeroed {
        Ok(()) => {
            for (i, &b) in blocks.iter().enumerate() {
                let key = first_key + i as u64;
                match shared.meta.insert(RESERVE_THIN, VBlock(key), b) {
                    Ok(()) => mapped.push((key, b)),
                    Err(e) => {
                        release_all(shared, &blocks[i..]);
                        shared.meta_error(e);
                        break;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!("zeroing blocks for the reserve failed: {e}");
            release_all(shared, &blocks);
        }
    }
    shared
        .counters
        .background_zeroed
        .fetch_add(mapped.len() as u64, Ordering::Relaxed);
    shared.reserve.end_refill(n, &mapped);
    shared.check_low_water();
    !mapped.is_empty()
}

fn release_all(shared: &Shared, blocks: &[DataBlock]) {
    for &b in blocks {
        // Fails only if the pool went read-only meanwhile, which dropped the transaction.
        let _ = shared.meta.release_data_block(b);
    }
}

/// Removes one batch of mappings of a deleted thin, or deletes it once empty.
fn free_deleted_step(shared: &Shared) -> bool {
    if shared.check_writable().is_err() {
        return false;
    }
    let meta = &shared.meta;
    let Some(trash) = meta
        .thins()
        .into_iter()
        .find(|t| t.0 >= FIRST_TRASH_ID && *t != RESERVE_THIN)
    else {
        return false;
    };
    let batch = shared.cfg.delete_batch_blocks as usize;
    let r = meta
        .mappings_in(trash, VBlock(0), VBlock(u64::MAX), batch)
        .and_then(|maps| match (maps.first(), maps.last()) {
            (Some(first), Some(last)) => {
                let _cut = crate::thin::Cut::begin(shared);
                meta.remove_range(trash, first.0, VBlock(last.0 .0 + 1))?;
                Ok(())
            }
            _ => meta.delete_thin(ThinId(trash.0)),
        });
    match r {
        Ok(()) => {
            crate::status::bump(&shared.counters.delete_steps);
            true
        }
        Err(thin_metadata::Error::NoSpace(Space::Metadata)) => {
            tracing::warn!("freeing deleted thin {}: metadata space low", trash.0);
            false
        }
        Err(e) => {
            shared.meta_error(e);
            false
        }
    }
}
