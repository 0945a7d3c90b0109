//! Pool commands that only touch the pool and its sidecar: the daemon runs them for its
//! clients, and a command runs them itself when no daemon holds the pool.

use crate::engine::{OpenPool, META_BLOCK_BYTES};
use crate::proto::Request;
use crate::sidecar::{check_name, Sidecar, ThinEntry};
use anyhow::{bail, Context, Result};
use block_io::data::rt;
use serde_json::{json, Value};

/// Which thins have a live device, by name, and its path.
pub trait Devices {
    fn bdev(&self, thin: &str) -> Option<String>;

    /// The data device grew: make the devices serving requests see its new size.
    fn data_grown(&self) -> Result<()> {
        Ok(())
    }
}

/// No daemon: no device is served.
pub struct NoDevices;

impl Devices for NoDevices {
    fn bdev(&self, _thin: &str) -> Option<String> {
        None
    }
}

/// Runs a pool command. Device commands (expose, unexpose, stop) are the daemon's.
pub fn execute(op: &mut OpenPool, devices: &dyn Devices, req: &Request) -> Result<Value> {
    match req {
        Request::Ping => Ok(json!({ "pool": op.sidecar.name })),
        Request::Status => Ok(status(op, devices)),
        Request::List => Ok(Value::Array(list(op, devices))),
        Request::Create { thin, size } => create(op, thin, *size),
        Request::Snapshot { origin, snap } => snapshot(op, origin, snap),
        Request::Delete { thin } => delete(op, devices, thin),
        Request::Resize { thin, size } => resize(op, devices, thin, *size),
        Request::Grow {
            data_size,
            metadata_size,
        } => grow(op, devices, *data_size, *metadata_size),
        Request::Trim => trim(op),
        Request::SetTransactionId { current, new } => {
            op.pool
                .set_transaction_id(*current, *new)
                .context("setting the transaction id")?;
            rt::block_on(op.pool.commit()).context("committing")?;
            Ok(json!({ "transaction_id": new }))
        }
        Request::Expose { .. }
        | Request::Unexpose { .. }
        | Request::Export { .. }
        | Request::Unexport { .. }
        | Request::Stop => bail!(
            "pool {:?} is not running; start it with `thin-ctl pool start {}`",
            op.sidecar.name,
            op.sidecar.name
        ),
    }
}

fn check_size(op: &OpenPool, size: u64) -> Result<()> {
    let lbs = ublk_target::logical_block_bytes(&op.pool);
    if size == 0 || !size.is_multiple_of(lbs) {
        bail!(
            "size {}: must be a non-zero multiple of {lbs} bytes",
            crate::size::format(size)
        );
    }
    Ok(())
}

fn create(op: &mut OpenPool, name: &str, size: u64) -> Result<Value> {
    check_name("thin", name)?;
    check_size(op, size)?;
    if op.sidecar.thins.contains_key(name) {
        bail!(
            "pool {:?} already has a thin named {name:?}",
            op.sidecar.name
        );
    }
    let id = Sidecar::free_id(&op.thin_ids())?;
    op.pool
        .create_thin(id)
        .with_context(|| format!("creating thin {name:?}"))?;
    rt::block_on(op.pool.commit()).context("committing")?;
    op.sidecar.thins.insert(
        name.to_string(),
        ThinEntry {
            id,
            size,
            exposed: None,
        },
    );
    op.save()?;
    Ok(json!({ "name": name, "id": id, "size": size }))
}

fn snapshot(op: &mut OpenPool, origin: &str, snap: &str) -> Result<Value> {
    check_name("thin", snap)?;
    let o = op.sidecar.thin(origin)?.clone();
    if op.sidecar.thins.contains_key(snap) {
        bail!(
            "pool {:?} already has a thin named {snap:?}",
            op.sidecar.name
        );
    }
    let id = Sidecar::free_id(&op.thin_ids())?;
    rt::block_on(op.pool.create_snap(id, o.id))
        .with_context(|| format!("snapshotting {origin:?}"))?;
    rt::block_on(op.pool.commit()).context("committing")?;
    op.sidecar.thins.insert(
        snap.to_string(),
        ThinEntry {
            id,
            size: o.size,
            exposed: None,
        },
    );
    op.save()?;
    Ok(json!({ "name": snap, "id": id, "size": o.size, "origin": origin }))
}

fn delete(op: &mut OpenPool, devices: &dyn Devices, name: &str) -> Result<Value> {
    let t = op.sidecar.thin(name)?.clone();
    if let Some(dev) = devices.bdev(name) {
        bail!("thin {name:?} is exposed as {dev}; `thin-ctl unexpose` it first");
    }
    op.pool
        .delete_thin(t.id)
        .with_context(|| format!("deleting thin {name:?}"))?;
    rt::block_on(op.pool.commit()).context("committing")?;
    op.sidecar.thins.remove(name);
    op.save()?;
    Ok(json!({ "deleted": name, "id": t.id }))
}

fn resize(op: &mut OpenPool, devices: &dyn Devices, name: &str, size: u64) -> Result<Value> {
    check_size(op, size)?;
    if let Some(dev) = devices.bdev(name) {
        bail!("thin {name:?} is exposed as {dev}; unexpose it to resize");
    }
    op.sidecar.thin_mut(name)?.size = size;
    op.save()?;
    Ok(json!({ "name": name, "size": size }))
}

fn grow(
    op: &mut OpenPool,
    devices: &dyn Devices,
    data_size: Option<u64>,
    metadata_size: Option<u64>,
) -> Result<Value> {
    if data_size.is_none() && metadata_size.is_none() {
        bail!("give --data-size and/or --metadata-size");
    }
    if let Some(bytes) = metadata_size {
        let nr = bytes / META_BLOCK_BYTES;
        op.meta.grow(nr).context("growing the metadata device")?;
        op.pool
            .grow_metadata(nr)
            .context("growing the metadata space")?;
    }
    if let Some(bytes) = data_size {
        let bs = op.sidecar.block_size;
        let nr = bytes / bs;
        let data = &op.sidecar.data;
        let have = crate::engine::device_size(data)? / bs;
        if nr > have {
            if !std::fs::metadata(data).is_ok_and(|m| m.is_file()) {
                bail!(
                    "{} holds {} ({have} blocks): resize the block device first",
                    data.display(),
                    crate::size::format(have * bs)
                );
            }
            crate::engine::grow_file(data, nr * bs)?;
        }
        devices.data_grown()?;
        op.pool.grow_data(nr).context("growing the data space")?;
    }
    rt::block_on(op.pool.commit()).context("committing")?;
    let st = op.pool.status();
    Ok(json!({
        "data_blocks_total": st.nr_data_blocks,
        "metadata_blocks_total": st.nr_metadata_blocks,
    }))
}

fn trim(op: &mut OpenPool) -> Result<Value> {
    let dev = crate::engine::data_factory(&op.sidecar.data, op.sidecar.block_size)()
        .context("opening the data device")?;
    let n = rt::block_on(op.pool.trim_free(&dev)).context("trimming free data blocks")?;
    Ok(json!({ "blocks_trimmed": n }))
}

fn list(op: &OpenPool, devices: &dyn Devices) -> Vec<Value> {
    let st = op.pool.status();
    op.sidecar
        .thins
        .iter()
        .map(|(name, t)| {
            let mapped = st
                .thins
                .iter()
                .find(|s| s.id == t.id)
                .map_or(0, |s| s.mapped_blocks);
            json!({
                "name": name,
                "id": t.id,
                "size": t.size,
                "mapped_blocks": mapped,
                "device": devices.bdev(name),
            })
        })
        .collect()
}

fn status(op: &OpenPool, devices: &dyn Devices) -> Value {
    let st = op.pool.status();
    let s = &st.stats;
    json!({
        "name": op.sidecar.name,
        "mode": st.mode.as_str(),
        "mode_reason": st.mode_reason,
        "block_size": st.data_block_size_bytes,
        "data_blocks_total": st.nr_data_blocks,
        "data_blocks_used": st.used_data_blocks,
        "data_blocks_free": st.free_data_blocks,
        "reserve_ready": st.reserve_ready,
        "reserve_target": st.reserve_target,
        "deleting_blocks": st.deleting_blocks,
        "metadata_blocks_total": st.nr_metadata_blocks,
        "metadata_blocks_used": st.nr_metadata_blocks - st.free_metadata_blocks,
        "low_water_mark_blocks": st.low_water_mark_blocks,
        "transaction_id": st.transaction_id,
        "needs_check": st.needs_check,
        "daemon_pid": op.dirs.daemon_pid(&op.sidecar.name),
        "metadata": op.sidecar.metadata,
        "data": op.sidecar.data,
        "thins": list(op, devices),
        "stats": {
            "reads": s.reads, "writes": s.writes, "discards": s.discards, "flushes": s.flushes,
            "provisions_full": s.provisions_full, "provisions_reserve": s.provisions_reserve,
            "provisions_sync_zero": s.provisions_sync_zero,
            "background_zeroed": s.background_zeroed, "copies": s.copies,
            "breaks_full": s.breaks_full, "zero_writes_elided": s.zero_writes_elided,
            "blocks_discarded": s.blocks_discarded, "blocks_passed_down": s.blocks_passed_down,
            "commits": s.commits, "commit_failures": s.commit_failures,
            "commit_avg_us": s.commit_avg_us, "commit_p99_us": s.commit_p99_us,
            "commit_max_us": s.commit_max_us, "no_space_waits": s.no_space_waits,
            "no_space_errors": s.no_space_errors,
        },
    })
}
