//! Commit: the space maps are written back through the same copy-on-write machinery, every
//! block written in the transaction goes to the device, a flush, then the superblock and a
//! second flush (docs/crash-model.md explains why each step is safe to lose).
//!
//! Writing back a space map allocates metadata blocks, which changes the metadata space map
//! itself; `write_back_metadata_sm` iterates until no bitmap is left without a new location.
//! Only blocks with count 0 or 1 change during that loop (fresh locations, unshared trees),
//! so it settles after a few rounds.

use crate::btree::{self, TreeKind};
use crate::error::{Error, Result};
use crate::format::{encode_bitmap, encode_metadata_index, MetaBlock, SmRoot, SUPERBLOCK_LOCATION};
use crate::space_map::SpaceMap;
use crate::store::Store;
use crate::thin::{Inner, ThinMetadata};

/// The blocks one commit writes, prepared under the exclusive lock, written without it.
#[derive(Debug)]
pub(crate) struct PreparedCommit {
    pub blocks: Vec<(u64, Box<MetaBlock>)>,
    pub superblock: Box<MetaBlock>,
}

impl ThinMetadata {
    /// Makes every change so far durable. Concurrent callers share nothing but the order:
    /// each commit waits for the previous one. Returns at once if nothing changed.
    pub fn commit(&self) -> Result<()> {
        self.commit_with_barrier(|| Ok(()))
    }

    /// `commit`, calling `barrier` after the transaction is captured and before anything is
    /// written: the pool flushes its data device there, so every data write whose mapping the
    /// commit records is durable before the superblock that names it. A barrier error latches
    /// the metadata read-only, like a failed commit write (the data's durability is unknown).
    pub fn commit_with_barrier(&self, barrier: impl FnOnce() -> std::io::Result<()>) -> Result<()> {
        let _serial = self.commit_lock.lock();
        let prepared = {
            let mut inner = self.inner.write();
            if inner.read_only {
                return Err(Error::ReadOnly);
            }
            if let Some(why) = &inner.poisoned {
                return Err(Error::InvalidArgument(format!(
                    "an earlier change failed ({why}); abort the transaction first"
                )));
            }
            if !inner.changed {
                return Ok(());
            }
            match inner.prepare_commit() {
                Ok(p) => p,
                Err(e) => {
                    inner.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
        };
        let written = barrier()
            .map_err(|source| Error::Io {
                op: "data device flush before",
                block: 0,
                source,
            })
            .and_then(|()| write_out(&*self.dev, &prepared));
        let mut inner = self.inner.write();
        match written {
            Ok(()) => {
                inner.store.commit_finished();
                inner.store.meta_sm.commit_done();
                inner.store.data_sm.commit_done();
                Ok(())
            }
            Err(e) => {
                inner.read_only = true;
                Err(e)
            }
        }
    }

    /// Throws away every change since the last commit by reopening the metadata from disk.
    pub fn abort(&self) -> Result<()> {
        let _serial = self.commit_lock.lock();
        let mut inner = self.inner.write();
        let fresh = Inner::load(self.dev.clone())?;
        *inner = fresh;
        Ok(())
    }
}

fn write_out(dev: &dyn block_io::MetaDevice, p: &PreparedCommit) -> Result<()> {
    let io = |op, block| move |source| Error::Io { op, block, source };
    let refs: Vec<(u64, &MetaBlock)> = p.blocks.iter().map(|(b, d)| (*b, &**d)).collect();
    let first = refs.first().map_or(0, |r| r.0);
    dev.write_blocks(&refs).map_err(io("write", first))?;
    dev.flush().map_err(io("flush", first))?;
    dev.write_block(SUPERBLOCK_LOCATION, &p.superblock)
        .map_err(io("write", SUPERBLOCK_LOCATION))?;
    dev.flush().map_err(io("flush", SUPERBLOCK_LOCATION))
}

impl Inner {
    /// Folds the transaction into blocks to write and hands its nodes to `committing`; the
    /// next transaction starts as this returns.
    pub(crate) fn prepare_commit(&mut self) -> Result<PreparedCommit> {
        self.store.in_commit = true;
        let r = self.write_back();
        self.store.in_commit = false;
        r?;
        let s = &mut self.store;
        let mut blocks: Vec<(u64, Box<MetaBlock>)> = Vec::with_capacity(s.dirty.len() + 8);
        for (&b, node) in &s.dirty {
            blocks.push((b, node.encode(b)));
        }
        for sm in [&s.data_sm, &s.meta_sm] {
            for bm in sm.bitmaps.iter().filter(|bm| bm.dirty) {
                blocks.push((bm.loc, encode_bitmap(&bm.bits, bm.loc)));
            }
        }
        let entries: Vec<_> = s
            .meta_sm
            .bitmaps
            .iter()
            .map(|bm| bm.index_entry())
            .collect();
        let index_loc = s.meta_sm.bitmap_root;
        blocks.push((index_loc, encode_metadata_index(&entries, index_loc)));
        blocks.extend(self.raw_dirty.drain());
        blocks.sort_unstable_by_key(|(b, _)| *b);

        let s = &mut self.store;
        self.sb.data_mapping_root = self.top_root;
        self.sb.device_details_root = self.details_root;
        self.sb.metadata_nr_blocks = s.meta_sm.nr_blocks();
        self.sb.data_sm_root = sm_root(&s.data_sm);
        self.sb.metadata_sm_root = sm_root(&s.meta_sm);
        let superblock = self.sb.encode(SUPERBLOCK_LOCATION);

        assert!(s.committing.is_empty(), "a previous commit did not finish");
        s.committing = std::mem::take(&mut s.dirty);
        s.meta_sm.commit_started();
        s.data_sm.commit_started();
        self.changed = false;
        Ok(PreparedCommit { blocks, superblock })
    }

    /// Writes the thins' roots and details into their trees, then both space maps into
    /// theirs. Everything stays in memory (dirty) until the caller encodes it.
    fn write_back(&mut self) -> Result<()> {
        let ids: Vec<u32> = self.thins.keys().copied().collect();
        self.flush_thins(&ids)?;
        write_back_data_sm(&mut self.store)?;
        write_back_metadata_sm(&mut self.store)
    }
}

fn sm_root(sm: &SpaceMap) -> SmRoot {
    SmRoot {
        nr_blocks: sm.nr_blocks(),
        nr_allocated: sm.nr_allocated(),
        bitmap_root: sm.bitmap_root,
        ref_count_root: sm.ref_count_root,
    }
}

/// Applies the pending changes to a space map's reference-count tree.
fn apply_overflow(s: &mut Store, data: bool) -> Result<()> {
    let sm = if data { &mut s.data_sm } else { &mut s.meta_sm };
    let changes = std::mem::take(&mut sm.overflow_changes);
    let mut root = sm.ref_count_root;
    for (b, count) in changes {
        root = match count {
            Some(c) => btree::insert(s, root, b, &c.to_le_bytes(), TreeKind::RefCount, true)?.0,
            None => btree::remove(s, root, b, TreeKind::RefCount, true)?.0,
        };
    }
    let sm = if data { &mut s.data_sm } else { &mut s.meta_sm };
    sm.ref_count_root = root;
    Ok(())
}

/// Gives a dirty bitmap a location of its own in this transaction.
fn relocate_bitmap(s: &mut Store, data: bool, i: usize) -> Result<()> {
    let new = s.alloc_meta()?;
    let sm = if data { &mut s.data_sm } else { &mut s.meta_sm };
    let bm = &mut sm.bitmaps[i];
    let old = std::mem::replace(&mut bm.loc, new);
    bm.loc_is_new = true;
    if old != 0 {
        s.dec_meta(old)?;
    }
    Ok(())
}

fn write_back_data_sm(s: &mut Store) -> Result<()> {
    apply_overflow(s, true)?;
    let dirty: Vec<usize> = (0..s.data_sm.bitmaps.len())
        .filter(|&i| s.data_sm.bitmaps[i].dirty)
        .collect();
    for &i in &dirty {
        if !s.data_sm.bitmaps[i].loc_is_new {
            relocate_bitmap(s, true, i)?;
        }
    }
    // Index entries last: they carry the final free counts of every dirty bitmap.
    let mut root = s.data_sm.bitmap_root;
    for i in dirty {
        let e = s.data_sm.bitmaps[i].index_entry().encode();
        root = btree::insert(s, root, i as u64, &e, TreeKind::SmIndex, true)?.0;
    }
    s.data_sm.bitmap_root = root;
    Ok(())
}

fn write_back_metadata_sm(s: &mut Store) -> Result<()> {
    // Each round can only dirty bitmaps (allocations and frees of unshared blocks), so the
    // number of rounds is bounded by the number of bitmaps plus the index block.
    for _round in 0..=s.meta_sm.bitmaps.len() + 2 {
        apply_overflow(s, false)?;
        if !s.meta_sm.bitmap_root_is_new {
            let new = s.alloc_meta()?;
            let old = std::mem::replace(&mut s.meta_sm.bitmap_root, new);
            s.meta_sm.bitmap_root_is_new = true;
            if old != 0 {
                s.dec_meta(old)?;
            }
        }
        let pending: Vec<usize> = (0..s.meta_sm.bitmaps.len())
            .filter(|&i| s.meta_sm.bitmaps[i].dirty && !s.meta_sm.bitmaps[i].loc_is_new)
            .collect();
        if pending.is_empty() && s.meta_sm.overflow_changes.is_empty() {
            return Ok(());
        }
        for i in pending {
            relocate_bitmap(s, false, i)?;
        }
    }
    Err(Error::corrupt(
        0,
        "metadata space map write-back did not settle",
    ))
}
