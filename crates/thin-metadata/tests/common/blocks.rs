//! Finds what every referenced metadata block is by walking the on-disk structures from the
//! superblock with the public `format` decoders alone, independently of the metadata code
//! under test. The corruption test uses it to pick blocks of each type.

use block_io::MetaDevice;
use std::collections::BTreeMap;
use thin_metadata::format::{
    decode_metadata_index, IndexEntry, MetaBlock, Node, NodeKind, Superblock, DETAILS_SIZE,
    ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE, META_BLOCK_SIZE, SUPERBLOCK_LOCATION,
};

/// The btrees of dm-thin metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// Thin id -> mapping root.
    MappingTop,
    /// A thin's virtual block -> (data block, time).
    Mapping,
    /// Thin id -> device details.
    Details,
    /// The data space map's index of bitmaps.
    DataSmIndex,
    /// Data blocks with a count of 3 or more.
    DataRefCount,
    /// Metadata blocks with a count of 3 or more.
    MetaRefCount,
}

impl Tree {
    fn leaf_value_size(self) -> usize {
        match self {
            Tree::MappingTop | Tree::Mapping => 8,
            Tree::Details => DETAILS_SIZE,
            Tree::DataSmIndex => INDEX_ENTRY_SIZE,
            Tree::DataRefCount | Tree::MetaRefCount => 4,
        }
    }
}

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Superblock,
    /// The held metadata snapshot's copy of the superblock.
    HeldSuperblock,
    Node {
        tree: Tree,
        leaf: bool,
    },
    /// The metadata space map's index block.
    MetaIndex,
    Bitmap {
        data: bool,
    },
}

/// One referenced block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    /// Reachable from the live superblock (not only from the held snapshot).
    pub live: bool,
    /// Nodes from the tree's root (0 for the root).
    pub depth: usize,
}

/// No tree is deeper than this (a cycle in damaged metadata would be).
const MAX_DEPTH: usize = 16;

struct Walker<'a> {
    dev: &'a dyn MetaDevice,
    live: bool,
    found: BTreeMap<u64, Info>,
}

impl Walker<'_> {
    fn read(&self, b: u64) -> Result<Box<MetaBlock>, String> {
        let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
        self.dev
            .read_block(b, &mut buf)
            .map_err(|e| format!("read of block {b}: {e}"))?;
        Ok(buf)
    }

    /// Records `b`; false when it was seen already (its subtree then was walked too).
    fn note(&mut self, b: u64, kind: Kind, depth: usize) -> Result<bool, String> {
        if let Some(info) = self.found.get(&b) {
            if info.kind != kind {
                return Err(format!("block {b} is both {:?} and {kind:?}", info.kind));
            }
            return Ok(false);
        }
        let live = self.live;
        self.found.insert(b, Info { kind, live, depth });
        Ok(true)
    }

    /// Walks a tree; returns the leaf values, in key order, of the nodes not seen before
    /// (what a seen node references was walked when it was first seen).
    fn tree(&mut self, root: u64, tree: Tree) -> Result<Vec<Vec<u8>>, String> {
        let mut values = Vec::new();
        self.node(root, tree, 0, &mut values)?;
        Ok(values)
    }

    fn node(
        &mut self,
        b: u64,
        tree: Tree,
        depth: usize,
        values: &mut Vec<Vec<u8>>,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "tree {tree:?} deeper than {MAX_DEPTH} at block {b}"
            ));
        }
        let raw = self.read(b)?;
        let node = Node::decode(&raw, b, tree.leaf_value_size())
            .map_err(|e| format!("{tree:?} node: {e}"))?;
        let leaf = node.kind == NodeKind::Leaf;
        if !self.note(b, Kind::Node { tree, leaf }, depth)? {
            // Seen before, so everything below it was walked then.
            return Ok(());
        }
        for i in 0..node.nr_entries() {
            if leaf {
                values.push(node.value(i).to_vec());
            } else {
                self.node(node.value_u64(i), tree, depth + 1, values)?;
            }
        }
        Ok(())
    }

    /// The trees named by a superblock (a live one or the held copy).
    fn superblock_trees(&mut self, sb: &Superblock) -> Result<(), String> {
        for v in self.tree(sb.data_mapping_root, Tree::MappingTop)? {
            let root = u64_at(&v);
            self.tree(root, Tree::Mapping)?;
        }
        self.tree(sb.device_details_root, Tree::Details)?;
        Ok(())
    }
}

fn u64_at(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    u64::from_le_bytes(b)
}

/// Every block referenced from the superblock (and the held snapshot), with its kind.
pub fn classify(dev: &dyn MetaDevice) -> Result<BTreeMap<u64, Info>, String> {
    let mut w = Walker {
        dev,
        live: true,
        found: BTreeMap::new(),
    };
    let raw = w.read(SUPERBLOCK_LOCATION)?;
    let sb = Superblock::decode(&raw, SUPERBLOCK_LOCATION).map_err(|e| e.to_string())?;
    w.note(SUPERBLOCK_LOCATION, Kind::Superblock, 0)?;
    w.superblock_trees(&sb)?;

    for v in w.tree(sb.data_sm_root.bitmap_root, Tree::DataSmIndex)? {
        let e = IndexEntry::decode(&v);
        w.note(e.blocknr, Kind::Bitmap { data: true }, 1)?;
    }
    w.tree(sb.data_sm_root.ref_count_root, Tree::DataRefCount)?;

    let index = sb.metadata_sm_root.bitmap_root;
    w.note(index, Kind::MetaIndex, 0)?;
    let nr_bitmaps = sb.metadata_sm_root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let entries =
        decode_metadata_index(&*w.read(index)?, index, nr_bitmaps).map_err(|e| e.to_string())?;
    for e in entries {
        w.note(e.blocknr, Kind::Bitmap { data: false }, 1)?;
    }
    w.tree(sb.metadata_sm_root.ref_count_root, Tree::MetaRefCount)?;

    if sb.held_root != 0 {
        w.live = false;
        w.note(sb.held_root, Kind::HeldSuperblock, 0)?;
        let raw = w.read(sb.held_root)?;
        let held = Superblock::decode(&raw, sb.held_root).map_err(|e| e.to_string())?;
        w.superblock_trees(&held)?;
    }
    Ok(w.found)
}
