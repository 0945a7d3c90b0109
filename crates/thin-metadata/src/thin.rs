//! The thin-provisioning metadata API the pool engine uses.
//!
//! # Concurrency contract
//! `ThinMetadata` is `Sync`; every method takes `&self`.
//! - Lookups (`lookup`, `details`, `status`, iteration) take a shared lock: any number run
//!   at once, on any threads. Cached nodes are read without I/O; an uncached node is read
//!   from the device under the shared lock (other lookups go on meanwhile).
//! - Changes (`insert`, `remove`, `create_thin`, ...) take the exclusive lock for their
//!   in-memory work only: one btree path of copies and splits, a few microseconds, plus the
//!   reads of any uncached nodes on that path.
//! - `commit` holds the exclusive lock only while it prepares: writing back the space maps
//!   and encoding the dirty blocks (in-memory work proportional to what changed). The device
//!   writes and flushes run without the lock, so lookups and the next transaction's changes
//!   proceed during commit I/O. Commits are serialized with each other.
//!
//! # Failure model
//! A change that fails half way (an I/O error reading a node, corruption found on the way)
//! poisons the transaction: further changes and commits are refused until `abort` returns
//! the metadata to the last commit. A failed commit write latches the metadata read-only
//! (`Error::ReadOnly`): nothing is retried silently, and lookups keep answering from memory.

use crate::btree::{self, TreeKind};
use crate::error::{Error, Result, Space};
use crate::format::{
    pack_block_time, unpack_block_time, DeviceDetails, MetaBlock, Superblock, MAX_METADATA_BLOCKS,
};
use crate::store::Store;
use crate::types::{DataBlock, Lookup, ThinId, VBlock, MAX_THIN_ID};
use block_io::MetaDevice;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Free metadata blocks one change may need beyond the reserve: two copied paths (a
/// two-level change) plus splits.
const OP_HEADROOM: u64 = 4 * crate::btree::MAX_HEIGHT as u64 + 8;

/// The fewest metadata blocks a pool can be formatted with.
pub const MIN_METADATA_BLOCKS: u64 = 64;

/// Parameters of a new pool's metadata.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Data block size in 512-byte sectors (dm-thin: 128..=2097152, a multiple of 128).
    pub data_block_size_sectors: u32,
    /// Number of data blocks.
    pub nr_data_blocks: u64,
}

/// A snapshot of the pool-wide figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub transaction_id: u64,
    pub time: u32,
    pub data_block_size_sectors: u32,
    pub nr_data_blocks: u64,
    pub nr_free_data_blocks: u64,
    pub nr_metadata_blocks: u64,
    pub nr_free_metadata_blocks: u64,
    /// Metadata blocks held back so that a commit can always complete.
    pub metadata_reserve_blocks: u64,
    /// Location of the held metadata snapshot, if any.
    pub held_root: Option<u64>,
    pub needs_check: bool,
    pub nr_thins: usize,
}

/// In-memory state of one thin.
#[derive(Debug, Clone)]
pub(crate) struct ThinState {
    /// Root of the thin's mapping tree (its one reference is owned here).
    pub root: u64,
    pub details: DeviceDetails,
    /// Root or details changed since the last commit.
    pub dirty: bool,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub store: Store,
    /// Fields carried over into the next superblock.
    pub sb: Superblock,
    pub top_root: u64,
    pub details_root: u64,
    pub thins: BTreeMap<u32, ThinState>,
    /// Whole blocks (held superblock copies) to write with the next commit.
    pub raw_dirty: HashMap<u64, Box<MetaBlock>>,
    pub changed: bool,
    pub poisoned: Option<String>,
    pub read_only: bool,
}

/// dm-thin v2 metadata on a metadata device.
#[derive(Debug)]
pub struct ThinMetadata {
    pub(crate) inner: RwLock<Inner>,
    /// Serializes commits (and abort) with each other.
    pub(crate) commit_lock: Mutex<()>,
    pub(crate) dev: Arc<dyn MetaDevice>,
}

impl ThinMetadata {
    /// Writes fresh, empty metadata to `dev` and opens it. Everything on the device is lost.
    pub fn format(dev: Arc<dyn MetaDevice>, opts: FormatOptions) -> Result<Self> {
        if opts.data_block_size_sectors == 0 {
            return Err(Error::InvalidArgument(
                "data block size must not be zero".into(),
            ));
        }
        if opts.nr_data_blocks > crate::format::details::MAX_DATA_BLOCK {
            return Err(Error::InvalidArgument(format!(
                "{} data blocks is more than dm-thin can address",
                opts.nr_data_blocks
            )));
        }
        let nr_meta = dev.nr_blocks().min(MAX_METADATA_BLOCKS);
        if nr_meta < MIN_METADATA_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "metadata device holds {nr_meta} blocks; at least {MIN_METADATA_BLOCKS} are needed"
            )));
        }
        let inner = Inner::format(dev.clone(), nr_meta, opts)?;
        let md = ThinMetadata {
            inner: RwLock::new(inner),
            commit_lock: Mutex::new(()),
            dev,
        };
        md.commit()?;
        Ok(md)
    }

    /// Opens the metadata on `dev`.
    pub fn open(dev: Arc<dyn MetaDevice>) -> Result<Self> {
        let inner = Inner::load(dev.clone())?;
        Ok(ThinMetadata {
            inner: RwLock::new(inner),
            commit_lock: Mutex::new(()),
            dev,
        })
    }

    /// The metadata device.
    pub fn device(&self) -> &Arc<dyn MetaDevice> {
        &self.dev
    }

    /// Sets how many clean btree nodes stay cached (4 KiB each).
    pub fn set_cache_capacity(&self, nodes: usize) {
        self.inner.read().store.set_cache_capacity(nodes);
    }

    /// Looks up one virtual block of a thin.
    pub fn lookup(&self, thin: ThinId, vblock: VBlock) -> Result<Lookup> {
        let inner = self.inner.read();
        let t = inner.thin(thin)?;
        match btree::lookup(&inner.store, t.root, vblock.0, TreeKind::MappingBottom)? {
            None => Ok(Lookup::Unprovisioned),
            Some((v, path_shared)) => {
                let (db, _time) = unpack_block_time(v.as_u64());
                let shared = path_shared || inner.store.data_sm.get(db) > 1;
                Ok(Lookup::Provisioned {
                    data_block: DataBlock(db),
                    shared,
                })
            }
        }
    }

    /// The data block `vblock` of `thin` maps to, if any: `lookup` for readers, who need not
    /// know whether the block is shared, so no space map is consulted.
    pub fn lookup_data_block(&self, thin: ThinId, vblock: VBlock) -> Result<Option<DataBlock>> {
        let inner = self.inner.read();
        let t = inner.thin(thin)?;
        Ok(
            btree::lookup_value(&inner.store, t.root, vblock.0, TreeKind::MappingBottom)?
                .map(|v| DataBlock(unpack_block_time(v.as_u64()).0)),
        )
    }

    /// `lookup` for a writer deciding whether it may overwrite in place (dm-thin's
    /// `__snapshotted_since`): `shared` is also true when the mapping predates the thin's
    /// latest snapshot. Sharing that ended in the current transaction (the other thin broke
    /// away, was discarded or deleted) still holds in the last committed state, and an
    /// in-place write would show through it after a crash; the mapping's time says so
    /// until the block is copied once.
    pub fn lookup_for_write(&self, thin: ThinId, vblock: VBlock) -> Result<Lookup> {
        let inner = self.inner.read();
        let t = inner.thin(thin)?;
        match btree::lookup(&inner.store, t.root, vblock.0, TreeKind::MappingBottom)? {
            None => Ok(Lookup::Unprovisioned),
            Some((v, path_shared)) => {
                let (db, time) = unpack_block_time(v.as_u64());
                let shared = path_shared
                    || inner.store.data_sm.get(db) > 1
                    || time < t.details.snapshotted_time;
                Ok(Lookup::Provisioned {
                    data_block: DataBlock(db),
                    shared,
                })
            }
        }
    }

    /// Allocates a free data block. The caller owns its one reference until it passes it to
    /// `insert` (or gives it back with `release_data_block`).
    pub fn alloc_data_block(&self) -> Result<DataBlock> {
        self.change(|inner| {
            inner
                .store
                .data_sm
                .alloc()
                .map(DataBlock)
                .ok_or(Error::NoSpace(Space::Data))
        })
    }

    /// Claims a free data block for the caller to write and then `insert`. Unlike
    /// `alloc_data_block` the claim lives in memory only: a commit before the insert records
    /// the block as free, so a crash between the data write and the insert leaks nothing.
    /// The pool engine provisions this way. Give an unused claim back with
    /// `release_data_block`.
    pub fn claim_data_block(&self) -> Result<DataBlock> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        inner
            .store
            .data_sm
            .claim()
            .map(DataBlock)
            .ok_or(Error::NoSpace(Space::Data))
    }

    /// Claims a run of up to `max` allocatable data blocks starting at the first one at or
    /// after `from` (for trimming free space: nobody else is handed them until each is
    /// released with `release_data_block`). `None` when no allocatable block is left there.
    pub fn claim_free_run(&self, from: u64, max: u64) -> Result<Option<(DataBlock, u64)>> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        Ok(inner
            .store
            .data_sm
            .claim_run(from, max)
            .map(|(first, len)| (DataBlock(first), len)))
    }

    /// Drops a reference to a data block obtained from `alloc_data_block`, or a claim from
    /// `claim_data_block`.
    pub fn release_data_block(&self, block: DataBlock) -> Result<()> {
        {
            let mut inner = self.inner.write();
            if inner.store.data_sm.unclaim(block.0) {
                return Ok(());
            }
        }
        self.change(|inner| {
            // Releasing a block the caller does not hold is the caller's bug, not damage on
            // disk: say so, and leave the counts alone.
            let sm = &mut inner.store.data_sm;
            if block.0 >= sm.nr_blocks() || sm.get(block.0) == 0 {
                return Err(Error::InvalidArgument(format!(
                    "data block {} is not allocated (pool has {} data blocks)",
                    block.0,
                    sm.nr_blocks()
                )));
            }
            sm.dec(block.0).map(drop)
        })
    }

    /// The reference count of a data block.
    pub fn data_block_count(&self, block: DataBlock) -> u32 {
        self.inner.read().store.data_sm.get(block.0)
    }

    /// Maps `vblock` of `thin` to `block`, taking over the caller's reference to `block`
    /// (or its claim). A previous mapping of `vblock` is released.
    pub fn insert(&self, thin: ThinId, vblock: VBlock, block: DataBlock) -> Result<()> {
        self.change_with_headroom(
            |inner| {
                inner.thin(thin)?;
                let sm = &inner.store.data_sm;
                let nr = sm.nr_blocks();
                if block.0 >= nr || (sm.get(block.0) == 0 && !sm.is_claimed(block.0)) {
                    return Err(Error::InvalidArgument(format!(
                        "data block {} is not allocated (pool has {nr} data blocks)",
                        block.0
                    )));
                }
                Ok(())
            },
            |inner| {
                if inner.store.data_sm.unclaim(block.0) {
                    inner.store.data_sm.inc(block.0)?;
                }
                inner.insert_mapping(thin, vblock, block)
            },
        )
    }

    /// Moves the mapping of `from_v` in `from` (which must be `block`) to `to_v` in `to`, in
    /// one change: the block's reference moves with it, and no commit can see the block
    /// unmapped. The pool moves pre-zeroed blocks out of its reserve thin this way.
    pub fn move_mapping(
        &self,
        from: ThinId,
        from_v: VBlock,
        to: ThinId,
        to_v: VBlock,
        block: DataBlock,
    ) -> Result<()> {
        self.change_with_headroom(
            |inner| {
                inner.thin(to)?;
                let root = inner.thin(from)?.root;
                let found = btree::lookup(&inner.store, root, from_v.0, TreeKind::MappingBottom)?
                    .map(|(v, _)| unpack_block_time(v.as_u64()).0);
                if found != Some(block.0) {
                    return Err(Error::InvalidArgument(format!(
                        "thin {from} block {} maps {found:?}, not data block {}",
                        from_v.0, block.0
                    )));
                }
                Ok(())
            },
            |inner| {
                let root = inner.thin(from)?.root;
                // `dec: false`: the reference moves to the new mapping.
                let (root, n, _) = btree::remove_range(
                    &mut inner.store,
                    root,
                    from_v.0,
                    from_v.0.saturating_add(1),
                    TreeKind::MappingBottom,
                    false,
                    |_| true,
                )?;
                let t = inner.thin_mut(from)?;
                t.root = root;
                t.details.mapped_blocks = t.details.mapped_blocks.saturating_sub(n);
                t.dirty = true;
                inner.insert_mapping(to, to_v, block)
            },
        )
    }

    /// Unmaps `vblock` of `thin`; returns whether it was mapped. The data block's reference
    /// is released (callers pass a discard down only when its count reaches zero).
    pub fn remove(&self, thin: ThinId, vblock: VBlock) -> Result<bool> {
        Ok(self.remove_range(thin, vblock, VBlock(vblock.0.saturating_add(1)))? == 1)
    }

    /// The mappings of `thin` in `[begin, end)`, in order, at most `limit` of them.
    pub fn mappings_in(
        &self,
        thin: ThinId,
        begin: VBlock,
        end: VBlock,
        limit: usize,
    ) -> Result<Vec<(VBlock, DataBlock)>> {
        let mut out = Vec::new();
        if limit == 0 || begin >= end {
            return Ok(out);
        }
        self.for_each_mapping(thin, begin, |v, d, _| {
            if v >= end {
                return false;
            }
            out.push((v, d));
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Unmaps every block of `thin` in `[begin, end)`; returns how many were mapped. If
    /// metadata space runs low part way (a range shared with a snapshot needs copies), it
    /// stops between batches with `NoSpace(Metadata)`, having removed a prefix of the range.
    pub fn remove_range(&self, thin: ThinId, begin: VBlock, end: VBlock) -> Result<u64> {
        self.change_with_headroom(
            |inner| inner.thin(thin).map(drop),
            |inner| {
                let root = inner.thin(thin)?.root;
                // Removing from a tree shared with a snapshot copies leaves: stop between
                // batches rather than run out of metadata space half way through one.
                let (root, n, done) = btree::remove_range(
                    &mut inner.store,
                    root,
                    begin.0,
                    end.0,
                    TreeKind::MappingBottom,
                    true,
                    |s| s.meta_sm.nr_free() >= s.meta_reserve + OP_HEADROOM,
                )?;
                let t = inner.thin_mut(thin)?;
                t.root = root;
                t.details.mapped_blocks = t.details.mapped_blocks.saturating_sub(n);
                t.dirty |= n > 0;
                Ok((n, done))
            },
        )
        .and_then(|(n, done)| match done {
            true => Ok(n),
            // The tree is complete and valid (no poisoning); only a prefix of the range is
            // gone.
            false => Err(Error::NoSpace(Space::Metadata)),
        })
    }

    /// Creates an empty thin.
    pub fn create_thin(&self, thin: ThinId) -> Result<()> {
        self.change_with_headroom(
            |inner| inner.check_new_id(thin),
            |inner| {
                let root = btree::new_tree(&mut inner.store, TreeKind::MappingBottom)?;
                let details = DeviceDetails {
                    mapped_blocks: 0,
                    transaction_id: inner.sb.trans_id,
                    creation_time: inner.sb.time,
                    snapshotted_time: inner.sb.time,
                };
                inner.thins.insert(
                    thin.0,
                    ThinState {
                        root,
                        details,
                        dirty: true,
                    },
                );
                Ok(())
            },
        )
    }

    /// Creates `snap` as a snapshot of `origin` in O(1): the two share the origin's mapping
    /// tree until either writes. The caller quiesces the origin's I/O around this call.
    pub fn create_snap(&self, snap: ThinId, origin: ThinId) -> Result<()> {
        self.change_with_headroom(
            |inner| {
                inner.check_new_id(snap)?;
                inner.thin(origin).map(drop)
            },
            |inner| {
                let o = inner.thin(origin)?.clone();
                inner.store.meta_sm.inc(o.root)?;
                inner.sb.time = inner.sb.time.wrapping_add(1);
                let time = inner.sb.time;
                let details = DeviceDetails {
                    mapped_blocks: o.details.mapped_blocks,
                    transaction_id: inner.sb.trans_id,
                    creation_time: time,
                    snapshotted_time: time,
                };
                let ot = inner.thin_mut(origin)?;
                ot.details.snapshotted_time = time;
                ot.dirty = true;
                inner.thins.insert(
                    snap.0,
                    ThinState {
                        root: o.root,
                        details,
                        dirty: true,
                    },
                );
                Ok(())
            },
        )
    }

    /// Deletes a thin and releases every block only it referenced.
    pub fn delete_thin(&self, thin: ThinId) -> Result<()> {
        self.change_with_headroom(
            |inner| inner.thin(thin).map(drop),
            |inner| {
                let t = inner
                    .thins
                    .remove(&thin.0)
                    .ok_or(Error::UnknownThin(thin.0))?;
                let s = &mut inner.store;
                // The committed trees may still name the thin; its root reference is the one
                // `t` owns, so the entry goes without releasing anything.
                inner.top_root = btree::remove(
                    s,
                    inner.top_root,
                    u64::from(thin.0),
                    TreeKind::MappingTop,
                    false,
                )?
                .0;
                inner.details_root = btree::remove(
                    s,
                    inner.details_root,
                    u64::from(thin.0),
                    TreeKind::Details,
                    false,
                )?
                .0;
                btree::dec_tree(s, t.root, TreeKind::MappingBottom)
            },
        )
    }

    /// The ids of all thins, ascending.
    pub fn thins(&self) -> Vec<ThinId> {
        self.inner
            .read()
            .thins
            .keys()
            .map(|&id| ThinId(id))
            .collect()
    }

    /// The details of one thin.
    pub fn details(&self, thin: ThinId) -> Result<DeviceDetails> {
        Ok(self.inner.read().thin(thin)?.details)
    }

    /// Calls `f(vblock, data_block, time)` for each mapping of `thin` with `vblock >= from`,
    /// in order, until `f` returns false. Holds the shared lock throughout.
    pub fn for_each_mapping(
        &self,
        thin: ThinId,
        from: VBlock,
        mut f: impl FnMut(VBlock, DataBlock, u32) -> bool,
    ) -> Result<()> {
        let inner = self.inner.read();
        let root = inner.thin(thin)?.root;
        btree::walk_from(
            &inner.store,
            root,
            TreeKind::MappingBottom,
            from.0,
            |k, v| {
                let (db, time) = unpack_block_time(crate::format::get_u64(v, 0));
                Ok(f(VBlock(k), DataBlock(db), time))
            },
        )
    }

    /// The highest mapped virtual block of `thin`, if any.
    pub fn highest_mapped(&self, thin: ThinId) -> Result<Option<VBlock>> {
        let mut last = None;
        self.for_each_mapping(thin, VBlock(0), |v, _, _| {
            last = Some(v);
            true
        })?;
        Ok(last)
    }

    /// Pool-wide figures.
    pub fn status(&self) -> PoolStatus {
        let inner = self.inner.read();
        let s = &inner.store;
        PoolStatus {
            transaction_id: inner.sb.trans_id,
            time: inner.sb.time,
            data_block_size_sectors: inner.sb.data_block_size,
            nr_data_blocks: s.data_sm.nr_blocks(),
            nr_free_data_blocks: s.data_sm.nr_unclaimed_free(),
            nr_metadata_blocks: s.meta_sm.nr_blocks(),
            nr_free_metadata_blocks: s.meta_sm.nr_free(),
            metadata_reserve_blocks: s.meta_reserve,
            held_root: (inner.sb.held_root != 0).then_some(inner.sb.held_root),
            needs_check: inner.sb.needs_check(),
            nr_thins: inner.thins.len(),
        }
    }

    /// Sets the userspace transaction id if it currently is `current` (compare and swap).
    pub fn set_transaction_id(&self, current: u64, new: u64) -> Result<()> {
        self.change(|inner| {
            if inner.sb.trans_id != current {
                return Err(Error::TransactionIdMismatch {
                    expected: current,
                    actual: inner.sb.trans_id,
                });
            }
            inner.sb.trans_id = new;
            Ok(())
        })
    }

    /// Grows the data space to `nr_blocks`.
    pub fn grow_data(&self, nr_blocks: u64) -> Result<()> {
        self.change(|inner| {
            let cur = inner.store.data_sm.nr_blocks();
            if nr_blocks < cur || nr_blocks > crate::format::details::MAX_DATA_BLOCK {
                return Err(Error::InvalidArgument(format!(
                    "cannot resize data space from {cur} to {nr_blocks} blocks (grow only)"
                )));
            }
            inner.store.data_sm.extend(nr_blocks);
            Ok(())
        })
    }

    /// Grows the metadata space to `nr_blocks` (the device must already be that large).
    pub fn grow_metadata(&self, nr_blocks: u64) -> Result<()> {
        let dev_blocks = self.dev.nr_blocks();
        self.change(|inner| {
            let cur = inner.store.meta_sm.nr_blocks();
            if nr_blocks < cur || nr_blocks > dev_blocks || nr_blocks > MAX_METADATA_BLOCKS {
                return Err(Error::InvalidArgument(format!(
                    "cannot resize metadata from {cur} to {nr_blocks} blocks (device has \
                     {dev_blocks}, format allows {MAX_METADATA_BLOCKS})"
                )));
            }
            inner.store.meta_sm.extend(nr_blocks);
            inner.sb.metadata_nr_blocks = nr_blocks;
            inner.update_reserve();
            Ok(())
        })
    }

    /// Sets the needs_check flag (written by the next commit).
    pub fn set_needs_check(&self) {
        let mut inner = self.inner.write();
        inner.sb.flags |= crate::format::superblock::NEEDS_CHECK_FLAG;
        inner.changed = true;
    }

    /// Clears the needs_check flag (written by the next commit), after a clean check.
    pub fn clear_needs_check(&self) {
        let mut inner = self.inner.write();
        inner.sb.flags &= !crate::format::superblock::NEEDS_CHECK_FLAG;
        inner.changed = true;
    }

    /// True when changes were made since the last commit.
    pub fn has_uncommitted_changes(&self) -> bool {
        self.inner.read().changed
    }

    /// Runs a change that needs no metadata allocation.
    fn change<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        let r = f(&mut inner);
        if r.is_ok() {
            inner.changed = true;
        }
        r
    }

    /// Runs `check` (which must not change anything), makes sure enough metadata blocks are
    /// free, then runs `apply`; a failure inside `apply` poisons the transaction.
    fn change_with_headroom<T>(
        &self,
        check: impl FnOnce(&Inner) -> Result<()>,
        apply: impl FnOnce(&mut Inner) -> Result<T>,
    ) -> Result<T> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        check(&inner)?;
        let s = &inner.store;
        if s.meta_sm.nr_free() < s.meta_reserve + OP_HEADROOM {
            return Err(Error::NoSpace(Space::Metadata));
        }
        inner.changed = true;
        let r = apply(&mut inner);
        if let Err(e) = &r {
            inner.poisoned = Some(e.to_string());
        }
        r
    }
}

impl Inner {
    /// Maps `vblock` of `thin` to `block`, whose reference the new mapping owns.
    fn insert_mapping(&mut self, thin: ThinId, vblock: VBlock, block: DataBlock) -> Result<()> {
        let value = pack_block_time(block.0, self.sb.time).to_le_bytes();
        let root = self.thin(thin)?.root;
        let (root, is_new) = btree::insert(
            &mut self.store,
            root,
            vblock.0,
            &value,
            TreeKind::MappingBottom,
            true,
        )?;
        let t = self.thin_mut(thin)?;
        t.root = root;
        t.details.mapped_blocks += u64::from(is_new);
        t.dirty = true;
        Ok(())
    }

    pub fn thin(&self, thin: ThinId) -> Result<&ThinState> {
        self.thins.get(&thin.0).ok_or(Error::UnknownThin(thin.0))
    }

    fn thin_mut(&mut self, thin: ThinId) -> Result<&mut ThinState> {
        self.thins
            .get_mut(&thin.0)
            .ok_or(Error::UnknownThin(thin.0))
    }

    fn check_new_id(&self, thin: ThinId) -> Result<()> {
        if thin.0 > MAX_THIN_ID {
            return Err(Error::InvalidArgument(format!(
                "thin id {thin} is above dm-thin's limit {MAX_THIN_ID}"
            )));
        }
        if self.thins.contains_key(&thin.0) {
            return Err(Error::ThinExists(thin.0));
        }
        Ok(())
    }

    pub fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.sb.needs_check() {
            return Err(Error::NeedsCheck);
        }
        if let Some(why) = &self.poisoned {
            return Err(Error::InvalidArgument(format!(
                "an earlier change failed ({why}); abort the transaction first"
            )));
        }
        Ok(())
    }

    /// Keeps enough metadata blocks back for a commit to rewrite every bitmap and index.
    pub fn update_reserve(&mut self) {
        let s = &mut self.store;
        let bitmaps = (s.meta_sm.bitmaps.len() + s.data_sm.bitmaps.len()) as u64;
        let wanted = 4096 + 2 * bitmaps;
        s.meta_reserve = wanted.min(s.meta_sm.nr_blocks() / 8);
    }
}
