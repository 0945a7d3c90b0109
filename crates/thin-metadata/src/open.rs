//! Opening existing metadata, formatting new metadata, and the held metadata snapshot.

use crate::btree::{self, TreeKind};
use crate::error::{Error, Result, Space};
use crate::format::{
    decode_bitmap, decode_metadata_index, DeviceDetails, IndexEntry, SmRoot, Superblock,
    ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS, SUPERBLOCK_LOCATION,
};
use crate::space_map::SpaceMap;
use crate::store::Store;
use crate::thin::{FormatOptions, Inner, ThinMetadata, ThinState};
use block_io::MetaDevice;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

impl Inner {
    /// Builds the in-memory state of brand-new metadata (written by the first commit).
    pub(crate) fn format(
        dev: Arc<dyn MetaDevice>,
        nr_meta: u64,
        opts: FormatOptions,
    ) -> Result<Self> {
        let mut meta_sm = SpaceMap::new(Space::Metadata, nr_meta);
        let sb_loc = meta_sm.alloc().ok_or(Error::NoSpace(Space::Metadata))?;
        assert_eq!(
            sb_loc, SUPERBLOCK_LOCATION,
            "the superblock takes the first block"
        );
        let data_sm = SpaceMap::new(Space::Data, opts.nr_data_blocks);
        let mut store = Store::new(dev, meta_sm, data_sm);
        let top_root = btree::new_tree(&mut store, TreeKind::MappingTop)?;
        let details_root = btree::new_tree(&mut store, TreeKind::Details)?;
        store.data_sm.bitmap_root = btree::new_tree(&mut store, TreeKind::SmIndex)?;
        store.data_sm.ref_count_root = btree::new_tree(&mut store, TreeKind::RefCount)?;
        store.meta_sm.ref_count_root = btree::new_tree(&mut store, TreeKind::RefCount)?;
        let sb = Superblock {
            flags: 0,
            uuid: [0; 16],
            version: crate::format::SUPERBLOCK_VERSION,
            time: 0,
            trans_id: 0,
            held_root: 0,
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            data_mapping_root: top_root,
            device_details_root: details_root,
            data_block_size: opts.data_block_size_sectors,
            metadata_block_size: crate::format::superblock::METADATA_BLOCK_SIZE_SECTORS,
            metadata_nr_blocks: nr_meta,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let mut inner = Inner {
            store,
            sb,
            top_root,
            details_root,
            thins: BTreeMap::new(),
            raw_dirty: HashMap::new(),
            changed: true,
            poisoned: None,
            read_only: false,
        };
        inner.update_reserve();
        Ok(inner)
    }

    /// Reads the last committed state from the device.
    pub(crate) fn load(dev: Arc<dyn MetaDevice>) -> Result<Self> {
        let probe = Store::new(
            dev.clone(),
            SpaceMap::new(Space::Metadata, 0),
            SpaceMap::new(Space::Data, 0),
        );
        let raw = probe.read_raw(SUPERBLOCK_LOCATION)?;
        if Superblock::is_blank(&raw) {
            return Err(Error::NotFormatted(
                "the metadata device is blank (all zeros)".into(),
            ));
        }
        let sb = Superblock::decode(&raw, SUPERBLOCK_LOCATION)?;
        let nr_meta = sb.metadata_sm_root.nr_blocks;
        if nr_meta > dev.nr_blocks() {
            return Err(Error::InvalidArgument(format!(
                "the metadata says it has {nr_meta} blocks but the device holds only {}",
                dev.nr_blocks()
            )));
        }
        if nr_meta.div_ceil(ENTRIES_PER_BITMAP) > MAX_METADATA_BITMAPS as u64 {
            return Err(Error::corrupt(
                SUPERBLOCK_LOCATION,
                format!("metadata space map claims {nr_meta} blocks, more than the format allows"),
            ));
        }
        // A store that can read nodes (bounded by the metadata size) before the space maps
        // are known.
        let mut store = Store::new(
            dev,
            SpaceMap::new(Space::Metadata, nr_meta),
            SpaceMap::new(Space::Data, 0),
        );
        let meta_sm = load_metadata_sm(&store, &sb.metadata_sm_root)?;
        let data_sm = load_data_sm(&store, &sb.data_sm_root)?;
        store.meta_sm = meta_sm;
        store.data_sm = data_sm;

        let mut details = BTreeMap::new();
        btree::walk_from(
            &store,
            sb.device_details_root,
            TreeKind::Details,
            0,
            |k, v| {
                details.insert(k, DeviceDetails::decode(v));
                Ok(true)
            },
        )?;
        let mut roots = BTreeMap::new();
        btree::walk_from(
            &store,
            sb.data_mapping_root,
            TreeKind::MappingTop,
            0,
            |k, v| {
                roots.insert(k, crate::format::get_u64(v, 0));
                Ok(true)
            },
        )?;
        if details.keys().ne(roots.keys()) {
            return Err(Error::corrupt(
                sb.device_details_root,
                format!(
                    "device details list thins {:?} but the mapping tree lists {:?}",
                    details.keys().collect::<Vec<_>>(),
                    roots.keys().collect::<Vec<_>>()
                ),
            ));
        }
        let mut thins = BTreeMap::new();
        for (id, d) in details {
            let id32 = u32::try_from(id).map_err(|_| {
                Error::corrupt(
                    sb.device_details_root,
                    format!("thin id {id} is out of range"),
                )
            })?;
            thins.insert(
                id32,
                ThinState {
                    root: roots[&id],
                    details: d,
                    dirty: false,
                },
            );
        }
        let mut inner = Inner {
            store,
            top_root: sb.data_mapping_root,
            details_root: sb.device_details_root,
            sb,
            thins,
            raw_dirty: HashMap::new(),
            changed: false,
            poisoned: None,
            read_only: false,
        };
        inner.update_reserve();
        Ok(inner)
    }
}

fn load_metadata_sm(store: &Store, root: &SmRoot) -> Result<SpaceMap> {
    let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let raw = store.read_raw(root.bitmap_root)?;
    let entries = decode_metadata_index(&raw, root.bitmap_root, nr_bitmaps)?;
    load_sm(store, Space::Metadata, root, &entries)
}

fn load_data_sm(store: &Store, root: &SmRoot) -> Result<SpaceMap> {
    let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let mut entries = Vec::new();
    btree::walk_from(store, root.bitmap_root, TreeKind::SmIndex, 0, |k, v| {
        if k != entries.len() as u64 {
            return Err(Error::corrupt(
                root.bitmap_root,
                format!(
                    "data space map index skips from bitmap {} to {k}",
                    entries.len()
                ),
            ));
        }
        entries.push(IndexEntry::decode(v));
        Ok(true)
    })?;
    if entries.len() as u64 != nr_bitmaps {
        return Err(Error::corrupt(
            root.bitmap_root,
            format!(
                "data space map index has {} bitmaps, expected {nr_bitmaps}",
                entries.len()
            ),
        ));
    }
    load_sm(store, Space::Data, root, &entries)
}

/// Reads the bitmaps the index entries name and the reference-count tree, and rebuilds the
/// in-memory space map from them.
fn load_sm(store: &Store, space: Space, root: &SmRoot, entries: &[IndexEntry]) -> Result<SpaceMap> {
    let mut sm = SpaceMap::from_disk(
        space,
        root.nr_blocks,
        read_bitmaps(store, entries)?,
        read_ref_counts(store, root.ref_count_root)?,
    )?;
    sm.bitmap_root = root.bitmap_root;
    sm.ref_count_root = root.ref_count_root;
    Ok(sm)
}

fn read_bitmaps(
    store: &Store,
    entries: &[IndexEntry],
) -> Result<Vec<(u64, Box<[u8; crate::format::BITMAP_BYTES]>)>> {
    entries
        .iter()
        .map(|e| {
            if e.blocknr == SUPERBLOCK_LOCATION || e.blocknr >= store.meta_sm.nr_blocks() {
                return Err(Error::corrupt(
                    e.blocknr,
                    "space map index points outside the metadata device",
                ));
            }
            let raw = store.read_raw(e.blocknr)?;
            Ok((e.blocknr, decode_bitmap(&raw, e.blocknr)?))
        })
        .collect()
}

fn read_ref_counts(store: &Store, root: u64) -> Result<HashMap<u64, u32>> {
    let mut counts = HashMap::new();
    btree::walk_from(store, root, TreeKind::RefCount, 0, |k, v| {
        counts.insert(k, crate::format::get_u32(v, 0));
        Ok(true)
    })?;
    Ok(counts)
}

impl ThinMetadata {
    /// Takes a read-only snapshot of the metadata (dm-thin's `reserve_metadata_snap`): a
    /// copy of the superblock whose trees stay intact, so userspace tools can read a live
    /// pool. It is written by the next commit. Only one can be held.
    pub fn reserve_metadata_snap(&self) -> Result<u64> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        if inner.sb.held_root != 0 {
            return Err(Error::InvalidArgument(format!(
                "a metadata snapshot is already held at block {}",
                inner.sb.held_root
            )));
        }
        let r = inner.reserve_metadata_snap();
        if let Err(e) = &r {
            inner.poisoned = Some(e.to_string());
        }
        inner.changed = true;
        r
    }

    /// Drops the held metadata snapshot.
    pub fn release_metadata_snap(&self) -> Result<()> {
        let mut inner = self.inner.write();
        inner.check_writable()?;
        if inner.sb.held_root == 0 {
            return Err(Error::InvalidArgument(
                "no metadata snapshot is held".into(),
            ));
        }
        let r = inner.release_metadata_snap();
        if let Err(e) = &r {
            inner.poisoned = Some(e.to_string());
        }
        inner.changed = true;
        r
    }
}

impl Inner {
    fn reserve_metadata_snap(&mut self) -> Result<u64> {
        // Put every thin's current root into the top-level tree, so the copy sees it.
        for t in self.thins.values_mut() {
            t.dirty = true;
        }
        let ids: Vec<u32> = self.thins.keys().copied().collect();
        self.flush_thins(&ids)?;
        let held = self.store.alloc_meta()?;
        let mut copy = self.sb.clone();
        copy.data_mapping_root = self.top_root;
        copy.device_details_root = self.details_root;
        copy.data_sm_root = SmRoot::default();
        copy.metadata_sm_root = SmRoot::default();
        copy.held_root = 0;
        self.raw_dirty.insert(held, copy.encode(held));
        self.store.meta_sm.inc(self.top_root)?;
        self.store.meta_sm.inc(self.details_root)?;
        // The top-level tree is now shared with the copy. Rewriting each thin's entry copies
        // every top-level leaf, and copying a shared leaf takes a reference to each thin's
        // mapping root: from here on those roots count as shared and get copied on write.
        for t in self.thins.values_mut() {
            t.dirty = true;
        }
        self.flush_thins(&ids)?;
        self.sb.held_root = held;
        Ok(held)
    }

    fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.sb.held_root;
        let copy = match self.raw_dirty.remove(&held) {
            Some(raw) => Superblock::decode(&raw, held)?,
            None => Superblock::decode(&*self.store.read_raw(held)?, held)?,
        };
        btree::dec_tree(
            &mut self.store,
            copy.data_mapping_root,
            TreeKind::MappingTop,
        )?;
        btree::dec_tree(&mut self.store, copy.device_details_root, TreeKind::Details)?;
        self.store.dec_meta(held)?;
        self.sb.held_root = 0;
        Ok(())
    }

    /// Writes the roots and details of the given (dirty) thins into the trees.
    pub(crate) fn flush_thins(&mut self, ids: &[u32]) -> Result<()> {
        for id in ids {
            let Some(t) = self.thins.get_mut(id) else {
                continue;
            };
            if !t.dirty {
                continue;
            }
            let key = u64::from(*id);
            let s = &mut self.store;
            let d = t.details.encode();
            self.details_root =
                btree::insert(s, self.details_root, key, &d, TreeKind::Details, true)?.0;
            let r = t.root.to_le_bytes();
            // The old root's reference moved to `t.root` when it was copied: don't release it.
            self.top_root =
                btree::insert(s, self.top_root, key, &r, TreeKind::MappingTop, false)?.0;
            t.dirty = false;
        }
        Ok(())
    }
}
