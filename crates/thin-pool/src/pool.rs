//! The pool: shared state of every queue thread, control operations, and the two background
//! threads (the committer and the worker).
//!
//! Threads:
//! - Queue threads (the front end's) run requests, each an async task, through `Thin`
//!   handles and their own data device.
//! - The committer (`commit.rs`) runs every commit: group commits for flushes and FUA writes,
//!   and the periodic commit. Metadata I/O never blocks a queue thread's other requests.
//! - The worker (`background.rs`) zeroes blocks into the reserve and frees deleted thins in
//!   bounded batches.
//!
//! Both background threads get their own data device from the factory given to `open`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bio_prison::{Level, Prison};
use block_io::data::{DataDevice, DataGeometry};
use block_io::MetaDevice;
use parking_lot::{Condvar, Mutex};
use thin_metadata::{FormatOptions, Space, ThinId, ThinMetadata};

use crate::bufs::CopyBufs;
use crate::config::PoolConfig;
use crate::error::{PoolError, Result};
use crate::event::Event;
use crate::reserve::{Reserve, FIRST_RESERVED_ID, FIRST_TRASH_ID, RESERVE_THIN};
use crate::status::{Counters, PoolEvent, PoolMode, PoolStatus, ThinCounters, ThinStatus};
use crate::thin::Thin;

/// State of one thin shared by its handles.
#[derive(Debug, Default)]
pub(crate) struct ThinShared {
    pub counters: ThinCounters,
    /// `Shared::change_seq` after this thin's latest metadata change.
    pub last_change: AtomicU64,
}

#[derive(Debug, Default)]
pub(crate) struct ThinEntry {
    pub shared: Arc<ThinShared>,
    pub open: usize,
}

/// The group-commit state (see `commit.rs`).
#[derive(Debug, Default)]
pub(crate) struct CommitState {
    /// Tickets handed out to flushes.
    pub requested: u64,
    /// Every ticket up to this one was served by a finished commit round.
    pub completed: u64,
    /// Every ticket up to this one was served by a successful round.
    pub ok_through: u64,
    pub stop: bool,
}

/// What the worker has been asked to do.
#[derive(Debug, Default)]
pub(crate) struct WorkerState {
    pub kicked: bool,
    pub stop: bool,
}

/// Everything the queue threads and the background threads share.
pub(crate) struct Shared {
    pub meta: ThinMetadata,
    pub prison: Prison,
    pub cfg: PoolConfig,
    /// The data device's geometry (all devices from the factory have the same).
    pub geometry: DataGeometry,
    mode: AtomicU8,
    mode_reason: Mutex<Option<String>>,
    pub counters: Counters,
    pub thins: Mutex<HashMap<u32, ThinEntry>>,
    /// Bumped after every metadata change a flush of some thin may need to commit.
    pub change_seq: AtomicU64,
    /// `change_seq` as captured before the latest successful commit.
    pub durable_seq: AtomicU64,
    pub commit: Mutex<CommitState>,
    pub commit_cv: Condvar,
    pub commit_done: Event,
    /// Signalled when data space may have appeared (grow, commit after frees, timeouts).
    pub space: Event,
    /// Bumped with every `space` signal.
    pub space_gen: AtomicU64,
    pub reserve: Reserve,
    pub worker: Mutex<WorkerState>,
    pub worker_cv: Condvar,
    /// Requests in flight (the worker slows down while this is non-zero).
    pub inflight: AtomicU64,
    lwm_fired: AtomicBool,
    meta_low_fired: AtomicBool,
    /// Cuts of sharing in progress, finished, and covered by a durable commit (thin.rs `Cut`).
    pub cuts_in_progress: AtomicU64,
    pub cut_seq: AtomicU64,
    pub cut_durable: AtomicU64,
    /// `space_gen + 1` when the worker last found no free block for the reserve; 0 if not.
    pub refill_stalled_at: AtomicU64,
    /// Bumped by each `grow_data`: background threads reopen their data device.
    pub data_grown: AtomicU64,
    /// Buffers for copies that carry a write.
    pub copy_bufs: CopyBufs,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &self.mode())
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

/// A thin-provisioning pool: metadata, data, and the engine serving thins from them.
///
/// `Pool` is `Send + Sync`; share it (in an `Arc`) between queue threads, open `Thin`
/// handles, and run requests through them with each thread's own data device. Dropping the
/// pool stops its background threads after a final commit (`close` does the same and reports
/// errors).
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// The data device's geometry now (a fresh open), for `grow_data`.
    probe: GeometryProbe,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("shared", &self.shared)
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// Opens the data device anew and reports its geometry.
type GeometryProbe = Arc<dyn Fn() -> io::Result<DataGeometry> + Send + Sync>;

/// A function making a data device for a background thread (called on that thread).
pub trait DeviceFactory<B>: Fn() -> io::Result<B> + Send + Sync + 'static {}
impl<B, F: Fn() -> io::Result<B> + Send + Sync + 'static> DeviceFactory<B> for F {}

impl Pool {
    /// Formats `meta_dev` for a pool of `nr_data_blocks` blocks of the data device's block
    /// size, then opens it.
    pub fn format<B: DataDevice + 'static>(
        meta_dev: Arc<dyn MetaDevice>,
        nr_data_blocks: u64,
        cfg: PoolConfig,
        make_device: impl DeviceFactory<B>,
    ) -> Result<Pool> {
        let geometry = make_device().map_err(PoolError::DataIo)?.geometry();
        check_block_size(geometry.block_size_bytes)?;
        if nr_data_blocks > geometry.nr_blocks {
            return Err(PoolError::Invalid(format!(
                "{nr_data_blocks} data blocks asked for, but the data device holds only {}",
                geometry.nr_blocks
            )));
        }
        ThinMetadata::format(
            meta_dev.clone(),
            FormatOptions {
                data_block_size_sectors: (geometry.block_size_bytes / 512) as u32,
                nr_data_blocks,
            },
        )?;
        Pool::open(meta_dev, cfg, make_device)
    }

    /// Opens the pool whose metadata is on `meta_dev`; `make_device` opens its data device
    /// (called once here for the geometry and once on each background thread).
    pub fn open<B: DataDevice + 'static>(
        meta_dev: Arc<dyn MetaDevice>,
        cfg: PoolConfig,
        make_device: impl DeviceFactory<B>,
    ) -> Result<Pool> {
        cfg.validate()?;
        let geometry = make_device().map_err(PoolError::DataIo)?.geometry();
        let meta = ThinMetadata::open(meta_dev)?;
        let st = meta.status();
        let block_bytes = u64::from(st.data_block_size_sectors) * 512;
        if block_bytes != geometry.block_size_bytes {
            return Err(PoolError::Invalid(format!(
                "the metadata says data blocks of {block_bytes} bytes, the data device was \
                 opened with {}",
                geometry.block_size_bytes
            )));
        }
        if st.nr_data_blocks > geometry.nr_blocks {
            return Err(PoolError::Invalid(format!(
                "the metadata describes {} data blocks but the data device holds only {}: \
                 wrong data device, or it was truncated",
                st.nr_data_blocks, geometry.nr_blocks
            )));
        }
        let reserve = Reserve::load(&meta)?;
        let shared = Arc::new(Shared {
            meta,
            prison: Prison::new(),
            cfg,
            geometry,
            mode: AtomicU8::new(PoolMode::Write.as_u8()),
            mode_reason: Mutex::new(None),
            counters: Counters::default(),
            thins: Mutex::new(HashMap::new()),
            change_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            commit: Mutex::new(CommitState::default()),
            commit_cv: Condvar::new(),
            commit_done: Event::default(),
            space: Event::default(),
            space_gen: AtomicU64::new(0),
            reserve,
            worker: Mutex::new(WorkerState {
                kicked: true,
                stop: false,
            }),
            worker_cv: Condvar::new(),
            inflight: AtomicU64::new(0),
            lwm_fired: AtomicBool::new(false),
            meta_low_fired: AtomicBool::new(false),
            refill_stalled_at: AtomicU64::new(0),
            data_grown: AtomicU64::new(0),
            cuts_in_progress: AtomicU64::new(0),
            cut_seq: AtomicU64::new(0),
            cut_durable: AtomicU64::new(0),
            copy_bufs: CopyBufs::new(geometry.block_size_bytes),
        });
        if st.needs_check {
            shared.set_mode(
                PoolMode::ReadOnly,
                "the metadata's needs_check flag is set".into(),
            );
        } else if shared.cfg.reserve_blocks > 0 && !shared.meta.thins().contains(&RESERVE_THIN) {
            match shared.meta.create_thin(RESERVE_THIN) {
                Ok(()) => {}
                // A pool whose metadata is full still opens; it zeroes synchronously.
                Err(thin_metadata::Error::NoSpace(Space::Metadata)) => tracing::warn!(
                    "metadata space is low: running without the pre-zeroed reserve (grow the \
                     metadata and reopen to get it back)"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        let make_device = Arc::new(make_device);
        let probe: GeometryProbe = {
            let f = make_device.clone();
            Arc::new(move || f().map(|d| d.geometry()))
        };
        let mut threads = Vec::new();
        {
            let (s, f) = (shared.clone(), make_device.clone());
            threads.push(spawn("thin-commit", move || crate::commit::run(&s, &*f))?);
        }
        {
            let (s, f) = (shared.clone(), make_device);
            threads.push(spawn("thin-worker", move || {
                crate::background::run(&s, &*f)
            })?);
        }
        Ok(Pool {
            shared,
            threads,
            probe,
        })
    }

    /// Opens a handle on thin `id` for I/O. A thin with open handles cannot be deleted.
    pub fn open_thin(&self, id: u32) -> Result<Thin> {
        check_user_id(id)?;
        // Checked under the table's lock, which `delete_thin` holds from its open check to
        // the metadata change: a handle never names a deleted thin.
        let mut thins = self.shared.thins.lock();
        if !self.shared.meta.thins().contains(&ThinId(id)) {
            return Err(PoolError::UnknownThin(id));
        }
        let e = thins.entry(id).or_default();
        e.open += 1;
        Ok(Thin::new(self.shared.clone(), id, e.shared.clone()))
    }

    /// Creates an empty thin.
    pub fn create_thin(&self, id: u32) -> Result<()> {
        check_user_id(id)?;
        self.shared.check_writable()?;
        self.shared
            .meta
            .create_thin(ThinId(id))
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.thin_changed(id);
        Ok(())
    }

    /// Creates `snap` as a snapshot of `origin`, live: writes to the origin drain and new ones
    /// wait while it is recorded (reads go on); then everything resumes. No suspend needed.
    pub async fn create_snap(&self, snap: u32, origin: u32) -> Result<()> {
        check_user_id(snap)?;
        check_user_id(origin)?;
        self.shared.check_writable()?;
        let _quiesce = self
            .shared
            .prison
            .exclusive_thin(bio_prison::ThinId(origin), Level::Write)
            .await;
        self.shared
            .meta
            .create_snap(ThinId(snap), ThinId(origin))
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.thin_changed(origin);
        self.shared.thin_changed(snap);
        Ok(())
    }

    /// Deletes a thin that no handle has open. It disappears at once; the background frees
    /// its blocks in bounded batches (a crash meanwhile resumes the freeing at the next open).
    pub fn delete_thin(&self, id: u32) -> Result<()> {
        check_user_id(id)?;
        self.shared.check_writable()?;
        // Holding the table's lock from the check to the metadata change keeps an
        // `open_thin` from slipping in between.
        let trash = {
            let thins = self.shared.thins.lock();
            if thins.get(&id).is_some_and(|e| e.open > 0) {
                return Err(PoolError::Busy(id));
            }
            let existing = self.shared.meta.thins();
            if !existing.contains(&ThinId(id)) {
                return Err(PoolError::UnknownThin(id));
            }
            let trash = (FIRST_TRASH_ID..RESERVE_THIN.0)
                .find(|t| !existing.contains(&ThinId(*t)))
                .ok_or_else(|| {
                    PoolError::Invalid(format!(
                        "{} deletions are still being freed; retry when they finish",
                        RESERVE_THIN.0 - FIRST_TRASH_ID
                    ))
                })?;
            // Not open, so no request can be in flight (requests go through handles). Move
            // the mapping tree to the trash id in O(1): a snapshot shares the root, the
            // delete drops the original's reference.
            let meta = &self.shared.meta;
            let _cut = crate::thin::Cut::begin(&self.shared);
            meta.create_snap(ThinId(trash), ThinId(id))
                .and_then(|()| meta.delete_thin(ThinId(id)))
                .map_err(|e| self.shared.control_error(e))?;
            trash
        };
        self.shared.thin_changed(trash);
        self.shared.kick_worker();
        Ok(())
    }

    /// The user thins' ids, ascending.
    pub fn thins(&self) -> Vec<u32> {
        self.shared
            .meta
            .thins()
            .into_iter()
            .map(|t| t.0)
            .filter(|&t| t < FIRST_RESERVED_ID)
            .collect()
    }

    /// Grows the data space to `nr_blocks` (the data device must already hold them: grow a
    /// file or resize a block device first, and `DataFile::refresh_size` the files under the
    /// devices that requests use). Queued writes resume. The pool's own background devices
    /// are reopened at the new size.
    pub fn grow_data(&self, nr_blocks: u64) -> Result<()> {
        self.shared.check_writable()?;
        let have = (self.probe)().map_err(PoolError::DataIo)?.nr_blocks;
        if nr_blocks > have {
            return Err(PoolError::Invalid(format!(
                "cannot grow to {nr_blocks} data blocks: the data device holds {have}"
            )));
        }
        self.shared
            .meta
            .grow_data(nr_blocks)
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.lwm_fired.store(false, Ordering::Relaxed);
        self.shared.data_grown.fetch_add(1, Ordering::SeqCst);
        if self.shared.mode() == PoolMode::OutOfDataSpace {
            // As dm-thin does at a resize; queued writes take the new blocks.
            self.shared.set_mode(
                PoolMode::Write,
                format!("data space grown to {nr_blocks} blocks"),
            );
        }
        self.shared.space_changed();
        self.shared.kick_worker();
        Ok(())
    }

    /// Grows the metadata space to `nr_blocks` (the metadata device must hold them).
    pub fn grow_metadata(&self, nr_blocks: u64) -> Result<()> {
        self.shared.check_writable()?;
        self.shared
            .meta
            .grow_metadata(nr_blocks)
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.meta_low_fired.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the userspace transaction id if it is `current` (dm-thin's message).
    pub fn set_transaction_id(&self, current: u64, new: u64) -> Result<()> {
        self.shared.check_writable()?;
        self.shared
            .meta
            .set_transaction_id(current, new)
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.change_seq.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Takes a metadata snapshot for live `thin_dump -m`; returns its block.
    pub fn reserve_metadata_snap(&self) -> Result<u64> {
        self.shared.check_writable()?;
        let b = self
            .shared
            .meta
            .reserve_metadata_snap()
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.change_seq.fetch_add(1, Ordering::SeqCst);
        Ok(b)
    }

    /// Drops the metadata snapshot.
    pub fn release_metadata_snap(&self) -> Result<()> {
        self.shared.check_writable()?;
        self.shared
            .meta
            .release_metadata_snap()
            .map_err(|e| self.shared.control_error(e))?;
        self.shared.change_seq.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Discards every free data block on `dev` (the pool's data device), as fstrim does for
    /// a filesystem; returns how many blocks were discarded. It commits first, so blocks freed
    /// by the open transaction are trimmed too. Each run of free blocks is claimed while it is
    /// discarded, so no request is handed one of them meanwhile, and released after.
    pub async fn trim_free<D: DataDevice>(&self, dev: &D) -> Result<u64> {
        const RUN_BLOCKS: u64 = 1024;
        self.shared.check_writable()?;
        self.commit().await?;
        let s = &*self.shared;
        let (mut from, mut total) = (0u64, 0u64);
        while let Some((first, len)) = s
            .meta
            .claim_free_run(from, RUN_BLOCKS)
            .map_err(|e| s.control_error(e))?
        {
            let r = dev
                .discard_blocks(block_io::data::DataBlock(first.0), len)
                .await;
            for b in first.0..first.0 + len {
                s.meta
                    .release_data_block(thin_metadata::DataBlock(b))
                    .map_err(|e| s.control_error(e))?;
            }
            s.space_changed();
            r.map_err(PoolError::DataIo)?;
            total += len;
            from = first.0 + len;
        }
        Ok(total)
    }

    /// Commits now (waiting for it): everything acknowledged so far is durable after this.
    pub async fn commit(&self) -> Result<()> {
        self.shared.commit_and_wait().await
    }

    /// The current mode.
    pub fn mode(&self) -> PoolMode {
        self.shared.mode()
    }

    /// Status and statistics of the pool and of every user thin.
    pub fn status(&self) -> PoolStatus {
        let s = &self.shared;
        let st = s.meta.status();
        let reserve_held = s.meta.details(RESERVE_THIN).map_or(0, |d| d.mapped_blocks);
        let mut deleting = 0;
        let mut thins = Vec::new();
        let table = s.thins.lock();
        for id in s.meta.thins() {
            let Ok(d) = s.meta.details(id) else { continue };
            if id.0 >= FIRST_TRASH_ID && id != RESERVE_THIN {
                deleting += d.mapped_blocks;
            }
            if id.0 >= FIRST_RESERVED_ID {
                continue;
            }
            let e = table.get(&id.0);
            let c = e.map(|e| &e.shared.counters);
            let l =
                |f: fn(&ThinCounters) -> &AtomicU64| c.map_or(0, |c| f(c).load(Ordering::Relaxed));
            thins.push(ThinStatus {
                id: id.0,
                mapped_blocks: d.mapped_blocks,
                open_count: e.map_or(0, |e| e.open),
                reads: l(|c| &c.reads),
                writes: l(|c| &c.writes),
                provisions: l(|c| &c.provisions),
                copies: l(|c| &c.copies),
                blocks_discarded: l(|c| &c.blocks_discarded),
            });
        }
        drop(table);
        let allocated = st.nr_data_blocks - st.nr_free_data_blocks;
        PoolStatus {
            mode: s.mode(),
            mode_reason: s.mode_reason.lock().clone(),
            transaction_id: st.transaction_id,
            data_block_size_bytes: s.geometry.block_size_bytes,
            nr_data_blocks: st.nr_data_blocks,
            used_data_blocks: allocated.saturating_sub(reserve_held + deleting),
            free_data_blocks: st.nr_free_data_blocks,
            reserve_ready: s.reserve.nr_ready(),
            reserve_target: s.cfg.reserve_blocks,
            deleting_blocks: deleting,
            nr_metadata_blocks: st.nr_metadata_blocks,
            free_metadata_blocks: st.nr_free_metadata_blocks,
            metadata_reserve_blocks: st.metadata_reserve_blocks,
            low_water_mark_blocks: s.cfg.low_water_mark_blocks,
            needs_check: st.needs_check,
            held_metadata_root: st.held_root,
            stats: s.counters.snapshot(),
            thins,
        }
    }

    /// The metadata (for checks and dumps of a live pool; do not change it directly).
    pub fn metadata(&self) -> &ThinMetadata {
        &self.shared.meta
    }

    /// The data device geometry.
    pub fn geometry(&self) -> DataGeometry {
        self.shared.geometry
    }

    /// Waits until the background has nothing left to do: the reserve is full (or no space
    /// is left for it) and deleted thins are freed. For tests and orderly shutdowns.
    pub fn wait_idle(&self) {
        loop {
            if self.shared.background_idle() {
                return;
            }
            self.shared.kick_worker();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Stops the background threads after a final commit; reports the commit's error.
    pub fn close(mut self) -> Result<()> {
        self.stop_threads();
        self.shared.final_commit()
    }

    /// Stops the worker first (it may still change metadata), then the committer, whose last
    /// round commits everything.
    fn stop_threads(&mut self) {
        let mut threads = std::mem::take(&mut self.threads);
        self.shared.worker.lock().stop = true;
        self.shared.worker_cv.notify_all();
        if let Some(worker) = threads.pop() {
            let _ = worker.join();
        }
        self.shared.commit.lock().stop = true;
        self.shared.commit_cv.notify_all();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.stop_threads();
        if let Err(e) = self.shared.final_commit() {
            tracing::error!("final commit at pool drop failed: {e}");
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(PoolError::DataIo)
}

fn check_block_size(bytes: u64) -> Result<()> {
    // dm-thin: 64 KiB to 1 GiB, a multiple of 64 KiB. We also take smaller powers of two
    // (4 KiB up) for tests and small pools; the kernel will not load those.
    if !(4096..=(1 << 30)).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(PoolError::Invalid(format!(
            "data block size {bytes} must be a multiple of 4 KiB between 4 KiB and 1 GiB \
             (dm-thin needs a multiple of 64 KiB)"
        )));
    }
    Ok(())
}

fn check_user_id(id: u32) -> Result<()> {
    if id >= FIRST_RESERVED_ID {
        return Err(PoolError::Invalid(format!(
            "thin id {id} is reserved for the pool itself (user ids are below \
             {FIRST_RESERVED_ID})"
        )));
    }
    Ok(())
}

impl Shared {
    pub fn mode(&self) -> PoolMode {
        PoolMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    /// Moves to `to`. ReadOnly and Fail are latched: only a reopen leaves them.
    pub fn set_mode(&self, to: PoolMode, why: String) {
        let mut reason = self.mode_reason.lock();
        let from = self.mode();
        if from == to
            || from == PoolMode::Fail
            || (from == PoolMode::ReadOnly && to != PoolMode::Fail)
        {
            return;
        }
        self.mode.store(to.as_u8(), Ordering::Release);
        *reason = (to != PoolMode::Write).then(|| why.clone());
        drop(reason);
        match to {
            PoolMode::Write => tracing::info!("pool mode {from} -> {to}: {why}"),
            _ => tracing::warn!("pool mode {from} -> {to}: {why}"),
        }
        self.emit(PoolEvent::ModeChanged { from, to, why });
        // Queued writes re-check: some now fail at once.
        self.space_changed();
    }

    pub fn emit(&self, ev: PoolEvent) {
        if let Some(hook) = &self.cfg.on_event {
            hook(&ev);
        }
    }

    /// Requests that change things need write (or out-of-data-space) mode.
    pub fn check_writable(&self) -> Result<()> {
        match self.mode() {
            PoolMode::Write | PoolMode::OutOfDataSpace => Ok(()),
            PoolMode::ReadOnly => Err(PoolError::ReadOnly(self.reason())),
            PoolMode::Fail => Err(PoolError::Failed(self.reason())),
        }
    }

    pub fn check_readable(&self) -> Result<()> {
        match self.mode() {
            PoolMode::Fail => Err(PoolError::Failed(self.reason())),
            _ => Ok(()),
        }
    }

    fn reason(&self) -> String {
        self.mode_reason
            .lock()
            .clone()
            .unwrap_or_else(|| "unknown".into())
    }

    /// Records that `thin`'s metadata changed: its next flush must commit.
    pub fn thin_changed(&self, thin: u32) {
        let ts = self.thins.lock().entry(thin).or_default().shared.clone();
        self.thin_changed_fast(thin, &ts);
    }

    /// Maps a metadata error of a request to the pool's reaction and the request's error:
    /// lack of space is the request's problem; anything else latches read-only (dm-thin's
    /// `metadata_operation_failed`): the transaction is aborted and changes refused.
    pub fn meta_error(&self, e: thin_metadata::Error) -> PoolError {
        match e {
            thin_metadata::Error::NoSpace(Space::Data) => PoolError::NoDataSpace,
            thin_metadata::Error::UnknownThin(id) => PoolError::UnknownThin(id),
            thin_metadata::Error::NoSpace(Space::Metadata) => {
                if !self.meta_low_fired.swap(true, Ordering::Relaxed) {
                    let free_blocks = self.meta.status().nr_free_metadata_blocks;
                    tracing::warn!(free_blocks, "metadata space low: provisioning refused");
                    self.emit(PoolEvent::MetadataLow { free_blocks });
                }
                PoolError::NoMetadataSpace
            }
            e => {
                let why = format!("metadata operation failed: {e}");
                self.latch_read_only(why.clone());
                PoolError::ReadOnly(why)
            }
        }
    }

    /// A control operation's metadata error: argument errors stay as they are.
    pub fn control_error(&self, e: thin_metadata::Error) -> PoolError {
        match e {
            thin_metadata::Error::UnknownThin(id) => PoolError::UnknownThin(id),
            thin_metadata::Error::ThinExists(id) => PoolError::ThinExists(id),
            thin_metadata::Error::InvalidArgument(_)
            | thin_metadata::Error::TransactionIdMismatch { .. } => PoolError::Metadata(e),
            e => self.meta_error(e),
        }
    }

    /// Aborts the transaction and refuses changes from now on. If even the abort fails the
    /// pool fails.
    pub fn latch_read_only(&self, why: String) {
        if matches!(self.mode(), PoolMode::ReadOnly | PoolMode::Fail) {
            return;
        }
        tracing::error!("{why}: aborting the transaction, pool goes read-only");
        // Read-only first: changes racing with the abort (whose claims it drops) fail as
        // read-only instead of latching again with a misleading reason.
        self.set_mode(PoolMode::ReadOnly, why.clone());
        match self.meta.abort() {
            Ok(()) => self.reserve.reload(&self.meta),
            Err(e) => self.set_mode(PoolMode::Fail, format!("{why}; reloading failed: {e}")),
        }
    }

    /// Something may have freed data space (or changed the mode): queued writes retry.
    pub fn space_changed(&self) {
        self.space_gen.fetch_add(1, Ordering::SeqCst);
        self.space.notify_all();
    }

    /// Free data blocks went below the low water mark: say so once.
    pub fn check_low_water(&self) {
        let mark = self.cfg.low_water_mark_blocks;
        if mark == 0 || self.lwm_fired.load(Ordering::Relaxed) {
            return;
        }
        let free_blocks = self.meta.status().nr_free_data_blocks;
        if free_blocks < mark && !self.lwm_fired.swap(true, Ordering::Relaxed) {
            tracing::warn!(free_blocks, mark, "data space below the low water mark");
            self.emit(PoolEvent::LowWaterMark { free_blocks, mark });
        }
    }

    pub fn kick_worker(&self) {
        self.worker.lock().kicked = true;
        self.worker_cv.notify_all();
    }

    /// True when the reserve holds its target (or no space is left for it) and no deleted
    /// thin waits to be freed.
    pub fn background_idle(&self) -> bool {
        let trash = self
            .meta
            .thins()
            .iter()
            .any(|t| t.0 >= FIRST_TRASH_ID && *t != RESERVE_THIN);
        if trash || self.reserve.nr_held() != self.reserve.nr_ready() {
            return false;
        }
        let full = self.reserve.nr_ready() >= self.cfg.reserve_blocks
            || !self.meta.thins().contains(&RESERVE_THIN);
        // The worker refills only in write mode (`refill_step`): out of data space it waits
        // for a write to find space again, so the reserve staying short is idle too.
        let refilling = self.mode() == PoolMode::Write;
        let stalled = self.refill_stalled_at.load(Ordering::SeqCst)
            == self.space_gen.load(Ordering::SeqCst) + 1;
        full || !refilling || stalled
    }
}
