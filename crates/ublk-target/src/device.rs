//! A thin as a ublk device: add (or recover) it, run its queue threads, and stop it.
//!
//! `serve` blocks its thread for the device's life, as libublk's `run_target` does, but sets
//! the queues up itself so that a queue that cannot start (its ring, its thin handle) fails
//! the start cleanly instead of leaving libublk waiting for its buffers forever. Control
//! commands go through libublk's per-thread control ring: `serve` uses its own thread's, and
//! `stop` and `state` set one up on whichever thread calls them.

use crate::error::{ublk_err, Error};
use crate::queue::{self, QueueContext};
use block_io::data::{DataFile, Limits};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use thin_pool::Pool;

/// The target type recorded in libublk's json (`/run/ublksrvd/NNNN.json`).
pub const TARGET_NAME: &str = "thin";

/// Most tags per queue (SPDK caps at 1024 too; old drivers overflowed above 2728).
pub const MAX_DEPTH: u16 = 1024;

/// Most queues of one device.
pub const MAX_QUEUES: u16 = 64;

/// Largest request, which is also each tag's buffer (libublk's limit is 32 MiB).
pub const MAX_IO_BUF_BYTES: u32 = 32 << 20;

/// Flags asked of the driver: user recovery with reissue, so that when the daemon dies the
/// device waits (quiesced) and a restarted daemon gets the in-flight requests again.
const CTRL_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// How a device is shaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    /// The device number N of `/dev/ublkbN`; `None` lets the driver pick.
    pub id: Option<u32>,
    /// Queues, each served by its own thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (and each tag's buffer).
    pub io_buf_bytes: u32,
    /// The device's size in bytes (dm-thin metadata does not hold thin sizes).
    pub size_bytes: u64,
    /// Limits of each queue's data engine.
    pub limits: Limits,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            id: None,
            queues: 1,
            depth: 128,
            io_buf_bytes: 512 << 10,
            size_bytes: 0,
            limits: Limits::default(),
        }
    }
}

impl DeviceOptions {
    /// Checks the options against each other and the pool's data alignment.
    pub fn validate(&self, logical_block_bytes: u64) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return bad(format!("{} queues: 1 to {MAX_QUEUES}", self.queues));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return bad(format!("queue depth {}: 1 to {MAX_DEPTH}", self.depth));
        }
        if self.io_buf_bytes < 4096
            || self.io_buf_bytes > MAX_IO_BUF_BYTES
            || !self.io_buf_bytes.is_multiple_of(4096)
        {
            return bad(format!(
                "I/O buffer of {} bytes: a multiple of 4096 up to {MAX_IO_BUF_BYTES}",
                self.io_buf_bytes
            ));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(logical_block_bytes) {
            return bad(format!(
                "device size {} bytes: must be a non-zero multiple of the {logical_block_bytes}-byte \
                 logical block",
                self.size_bytes
            ));
        }
        Ok(())
    }
}

/// The thin a device serves.
#[derive(Debug, Clone)]
pub struct Target {
    pub pool: Arc<Pool>,
    pub thin_id: u32,
    /// The pool's data device, opened with O_DIRECT; each queue ring registers it.
    pub data: Arc<DataFile>,
    /// Recorded in the device's json, for operators reading `/run/ublksrvd`.
    pub label: String,
    /// Writes the device acknowledged were lost (its previous daemon died before committing
    /// them): its next flush reports EIO, so the application is told.
    pub lost_writes: bool,
}

/// How to bring the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new device.
    Add,
    /// Reattach to device N, left quiesced by a daemon that died.
    Recover(u32),
}

/// A device that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub dev_id: u32,
    /// `/dev/ublkbN`.
    pub bdev: PathBuf,
}

/// The driver's view of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevState {
    Dead,
    Live,
    /// Its daemon died; it waits for `Start::Recover`.
    Quiesced,
    FailIo,
    Other(u16),
}

impl DevState {
    fn from_raw(s: u16) -> DevState {
        match u32::from(s) {
            sys::UBLK_S_DEV_DEAD => DevState::Dead,
            sys::UBLK_S_DEV_LIVE => DevState::Live,
            sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
            _ => DevState::Other(s),
        }
    }
}

/// The logical block size a thin's device gets: what O_DIRECT on the data device needs.
pub fn logical_block_bytes(pool: &Pool) -> u64 {
    pool.geometry().align_bytes.max(512)
}

fn shift_of(v: u64) -> u8 {
    v.trailing_zeros() as u8
}

/// The parameters the driver gets: sizes, a volatile cache with FUA (so flushes reach the
/// pool), discard and write-zeroes at the pool's block granularity.
fn params(pool: &Pool, size_bytes: u64, io_buf_bytes: u32) -> sys::ublk_params {
    let geo = pool.geometry();
    let lbs = logical_block_bytes(pool);
    let pbs = lbs.max(4096);
    // io_opt is a shift: the largest power of two dividing the pool's block size.
    let opt = 1u64 << geo.block_size_bytes.trailing_zeros();
    let max_discard_sectors = u32::try_from((1u64 << 30) >> 9).unwrap_or(u32::MAX);
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift_of(lbs),
            physical_bs_shift: shift_of(pbs),
            io_opt_shift: shift_of(opt.max(pbs)),
            io_min_shift: shift_of(pbs),
            max_sectors: io_buf_bytes >> 9,
            dev_sectors: size_bytes >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: u32::try_from(geo.block_size_bytes).unwrap_or(u32::MAX),
            max_discard_sectors,
            max_write_zeroes_sectors: max_discard_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Makes sure this thread has libublk's control ring (it is per thread).
fn ensure_ctrl_ring() -> Result<(), Error> {
    libublk::ublk_init_ctrl_task_ring(|r| {
        if r.is_none() {
            *r = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| ublk_err("setting up the ublk control ring", e))
}

/// Serves `target` as a ublk device until it is stopped (`stop`, or the driver removing it).
/// `on_live` runs once the device is up. Blocks the calling thread.
pub fn serve(
    target: Target,
    opts: &DeviceOptions,
    start: Start,
    on_live: impl FnOnce(&Live),
) -> Result<(), Error> {
    crate::probe()?;
    ensure_ctrl_ring()?;
    let lbs = logical_block_bytes(&target.pool);
    let ctrl = match start {
        Start::Add => {
            opts.validate(lbs)?;
            let id = opts.id.map_or(-1, |id| id as i32);
            UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(id)
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(opts.io_buf_bytes)
                .ctrl_flags(CTRL_FLAGS)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| match (opts.id, e) {
                    (Some(id), libublk::UblkError::OtherError(e)) if e == -libc::EEXIST => {
                        Error::Busy(format!("/dev/ublkb{id} already exists"))
                    }
                    (_, e) => ublk_err("adding the ublk device", e),
                })?
        }
        Start::Recover(id) => recover_ctrl(id)?,
    };
    let info = ctrl.dev_info();
    let dev_id = info.dev_id;
    let size_bytes = match start {
        Start::Add => opts.size_bytes,
        Start::Recover(_) => 0, // the driver keeps the size; SET_PARAMS is skipped.
    };
    let res = run_device(&ctrl, &target, size_bytes, opts.limits, on_live);
    // Stopped or failed: remove the device (a recovered one too: nothing serves it now).
    if let Err(e) = ctrl.del_dev() {
        tracing::warn!("removing /dev/ublkb{dev_id}: {e:?}");
    }
    res
}

/// A control handle for a quiesced device, after START_USER_RECOVERY.
fn recover_ctrl(id: u32) -> Result<UblkCtrl, Error> {
    let probe = UblkCtrl::new_simple(id as i32)
        .map_err(|e| ublk_err(&format!("opening /dev/ublkc{id}"), e))?;
    let info = probe.dev_info();
    match DevState::from_raw(info.state) {
        DevState::Quiesced => {}
        s => {
            return Err(Error::Invalid(format!(
                "/dev/ublkb{id} is {s:?}, not quiesced: only a device whose daemon died can be \
                 recovered"
            )))
        }
    }
    if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(Error::Invalid(format!(
            "/dev/ublkb{id} was created without user recovery"
        )));
    }
    match probe.start_user_recover() {
        Ok(r) if r < 0 => {
            return Err(ublk_err(
                "starting user recovery",
                libublk::UblkError::OtherError(r),
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(ublk_err("starting user recovery", e)),
    }
    UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(CTRL_FLAGS)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| ublk_err("reattaching the ublk device", e))
}

/// Sets up the device and its queues, starts it, and waits for the queues to end.
fn run_device(
    ctrl: &UblkCtrl,
    target: &Target,
    size_bytes: u64,
    limits: Limits,
    on_live: impl FnOnce(&Live),
) -> Result<(), Error> {
    let info = ctrl.dev_info();
    let dev_id = info.dev_id;
    let data_fd = std::os::fd::AsRawFd::as_raw_fd(&*target.data);
    let depth = u32::from(info.queue_depth);
    let tgt_params = params(&target.pool, size_bytes, info.max_io_buf_bytes);
    let label = target.label.clone();
    let thin_id = target.thin_id;
    let tgt_init = move |dev: &mut UblkDev| {
        let tgt = &mut dev.tgt;
        tgt.dev_size = size_bytes;
        tgt.params = tgt_params;
        let n = tgt.nr_fds as usize;
        tgt.fds[n] = data_fd;
        tgt.nr_fds += 1;
        // A request may have several data SQEs in flight (one per block it spans, copies
        // read and write): room for four per tag, as rublk's qcow2 does.
        let ring_depth = (depth * 4).clamp(64, 4096) as u16;
        tgt.sq_depth = ring_depth;
        tgt.cq_depth = ring_depth;
        dev.set_target_json(serde_json_value(&label, thin_id, size_bytes));
        Ok(())
    };
    let dev = Arc::new(
        UblkDev::new(TARGET_NAME.to_string(), tgt_init, ctrl)
            .map_err(|e| ublk_err("setting up the ublk device", e))?,
    );
    debug_assert_eq!(dev.tgt.fds[crate::ring::DATA_FIXED_INDEX as usize], data_fd);
    let ctx = QueueContext {
        pool: target.pool.clone(),
        thin_id: target.thin_id,
        data: target.data.clone(),
        limits,
        lost_writes: Arc::new(std::sync::atomic::AtomicBool::new(target.lost_writes)),
    };
    let (tx, rx) = mpsc::channel::<(u16, libc::pid_t, Result<(), String>)>();
    let mut threads = Vec::new();
    for qid in 0..info.nr_hw_queues {
        let (dev, ctx, tx) = (dev.clone(), ctx.clone(), tx.clone());
        let t = std::thread::Builder::new()
            .name(format!("ublk{dev_id}q{qid}"))
            .spawn(move || {
                let tid = UblkCtrl::init_queue_thread();
                match queue::setup(qid, &dev, &ctx) {
                    Ok(ready) => {
                        let _ = tx.send((qid, tid, Ok(())));
                        drop(tx);
                        queue::run(ready);
                    }
                    Err(e) => {
                        let _ = tx.send((qid, tid, Err(e)));
                    }
                }
            })
            .map_err(|e| Error::Io(format!("spawning a queue thread: {e}")))?;
        threads.push(t);
    }
    drop(tx);
    let mut failure = None;
    for _ in 0..info.nr_hw_queues {
        match rx.recv() {
            Ok((qid, tid, Ok(()))) => {
                ctrl.set_thread_affinity(qid, tid);
                if let Err(e) = ctrl.configure_queue(&dev, qid, tid) {
                    tracing::warn!("ublkb{dev_id}: recording queue {qid}: {e:?}");
                }
            }
            Ok((_, _, Err(e))) => failure = Some(Error::Setup(e)),
            Err(_) => failure = Some(Error::Setup("a queue thread died".into())),
        }
    }
    let started = match failure {
        Some(e) => Err(e),
        None => ctrl
            .start_dev(&dev)
            .map_err(|e| ublk_err("starting the ublk device", e))
            .and_then(|r| {
                if r < 0 {
                    Err(ublk_err(
                        "starting the ublk device",
                        libublk::UblkError::OtherError(r),
                    ))
                } else {
                    Ok(())
                }
            }),
    };
    match &started {
        Ok(()) => on_live(&Live {
            dev_id,
            bdev: PathBuf::from(ctrl.get_bdev_path()),
        }),
        // The queues that did start are waiting for requests: stopping aborts them.
        Err(_) => {
            let _ = ctrl.kill_dev();
        }
    }
    for t in threads {
        if t.join().is_err() {
            tracing::error!("ublkb{dev_id}: a queue thread panicked");
        }
    }
    // Device may already be gone (deleted from another context): ENOENT is normal.
    let _ = ctrl.stop_dev();
    started
}

fn serde_json_value(label: &str, thin_id: u32, size_bytes: u64) -> serde_json::Value {
    serde_json::json!({ "thin": { "label": label, "thin_id": thin_id, "size": size_bytes } })
}

/// Stops device `dev_id` from any thread: the driver stops accepting requests, in-flight ones
/// finish, the queues end and `serve` returns (and removes the device).
pub fn stop(dev_id: u32) -> Result<(), Error> {
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32)
        .map_err(|e| ublk_err(&format!("opening /dev/ublkc{dev_id}"), e))?;
    ctrl.kill_dev()
        .map_err(|e| ublk_err(&format!("stopping /dev/ublkb{dev_id}"), e))?;
    Ok(())
}

/// Removes device `dev_id` that no daemon serves (e.g. a quiesced one nobody will recover).
pub fn remove(dev_id: u32) -> Result<(), Error> {
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32)
        .map_err(|e| ublk_err(&format!("opening /dev/ublkc{dev_id}"), e))?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev()
        .map_err(|e| ublk_err(&format!("removing /dev/ublkb{dev_id}"), e))?;
    Ok(())
}

/// The driver's state of device `dev_id`, or `None` if it does not exist.
pub fn state(dev_id: u32) -> Result<Option<DevState>, Error> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return Ok(None);
    }
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32)
        .map_err(|e| ublk_err(&format!("opening /dev/ublkc{dev_id}"), e))?;
    Ok(Some(DevState::from_raw(ctrl.dev_info().state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let o = DeviceOptions {
            size_bytes: 1 << 20,
            ..Default::default()
        };
        assert!(o.validate(512).is_ok());
        for bad in [
            DeviceOptions {
                queues: 0,
                ..o.clone()
            },
            DeviceOptions {
                depth: 1025,
                ..o.clone()
            },
            DeviceOptions {
                io_buf_bytes: 1000,
                ..o.clone()
            },
            DeviceOptions {
                size_bytes: 0,
                ..o.clone()
            },
            DeviceOptions {
                size_bytes: 4096 + 512,
                ..o.clone()
            },
        ] {
            let lbs = if bad.size_bytes == 4096 + 512 {
                4096
            } else {
                512
            };
            assert!(
                matches!(bad.validate(lbs), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
