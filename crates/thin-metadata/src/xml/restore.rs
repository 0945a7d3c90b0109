//! Writing fresh metadata from thin_dump XML.
//!
//! The whole document is parsed and validated first, then the new metadata is built in
//! memory as one transaction: each device's mapping tree bottom-up from its sorted mappings
//! (leaves packed full, entries spread evenly so no node is under a third full), data
//! reference counts one per mapping, and the details tree, mapping top level and both space
//! maps by the ordinary commit. Devices share data blocks but no tree nodes, as with
//! thin_restore: the XML does not say which subtrees were shared.
//!
//! Invariants:
//! - nothing is written before the XML has been read to its end and found valid, and before
//!   the metadata space it needs is known to fit the device: a bad input leaves the device
//!   as it was;
//! - once writing starts, block 0 is zeroed (and flushed) first and the new superblock is
//!   written last, after a flush: an interrupted restore leaves a device that reads as
//!   unformatted, never as half-restored metadata or as the old metadata over overwritten
//!   blocks;
//! - finished mapping-tree nodes may be written early, and then leave memory, so memory
//!   stays bounded for large restores; nothing reads them again before the final commit,
//!   which flushes them along with everything else before the superblock.

use super::parse::{self, DeviceEntry, Document};
use super::{CorrectedCount, RestoreSummary};
use crate::btree::{self, TreeKind};
use crate::error::{Error, Result};
use crate::format::{
    max_entries, pack_block_time, zeroed_block, DeviceDetails, MetaBlock, Node, NodeKind,
    DETAILS_SIZE, ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE, MAX_METADATA_BLOCKS, SUPERBLOCK_LOCATION,
};
use crate::store::Store;
use crate::thin::{FormatOptions, Inner, ThinMetadata, ThinState, MIN_METADATA_BLOCKS};
use block_io::MetaDevice;
use parking_lot::{Mutex, RwLock};
use std::io::BufRead;
use std::sync::Arc;

/// Finished mapping nodes are written out once this many wait in memory (64 MiB; a few in
/// unit tests, so that they spill).
pub(super) const SPILL_NODES: usize = if cfg!(test) { 32 } else { 16384 };

/// Blocks written by one device call when spilling.
const WRITE_BATCH: usize = 256;

/// Replaces the metadata on `dev` with the metadata `xml` describes.
pub fn restore(xml: &mut dyn BufRead, dev: Arc<dyn MetaDevice>) -> Result<RestoreSummary> {
    let doc = parse::parse(xml)?;
    let nr_meta = dev.nr_blocks().min(MAX_METADATA_BLOCKS);
    if nr_meta < MIN_METADATA_BLOCKS {
        return Err(Error::InvalidArgument(format!(
            "the metadata device holds {nr_meta} blocks; at least {MIN_METADATA_BLOCKS} are needed"
        )));
    }
    let sb = &doc.superblock;
    let opts = FormatOptions {
        data_block_size_sectors: sb.data_block_size,
        nr_data_blocks: sb.nr_data_blocks,
    };
    // Before the space maps take memory and the references are counted (both in proportion
    // to the XML's claims): does the metadata fit at all?
    check_space(metadata_needed(&doc, nr_meta, 0), 0, nr_meta)?;
    // Everything up to `blank_superblock` happens in memory only.
    let mut inner = Inner::format(dev.clone(), nr_meta, opts)?;
    let mut summary = count_data_references(&doc, &mut inner.store)?;
    // Counts of three and more go to the ref-count tree; in a fresh space map every one of
    // them is a pending change.
    let nr_overflow = inner.store.data_sm.overflow_changes.len() as u64;
    let needed = metadata_needed(&doc, nr_meta, nr_overflow);
    check_space(needed, inner.store.meta_reserve, nr_meta)?;

    blank_superblock(&*dev)?;
    let mut finished: Vec<u64> = Vec::new();
    for d in &doc.devices {
        let root = build_mapping_tree(&mut inner.store, d, &mut finished)?;
        let details = DeviceDetails {
            mapped_blocks: d.nr_mapped,
            transaction_id: d.transaction,
            creation_time: d.creation_time,
            snapshotted_time: d.snap_time,
        };
        inner.thins.insert(
            d.id,
            ThinState {
                root,
                details,
                dirty: true,
            },
        );
        if finished.len() >= SPILL_NODES {
            spill(&mut inner.store, &mut finished)?;
        }
        if d.stated_mapped_blocks != d.nr_mapped {
            summary.mapped_blocks_corrected.push(CorrectedCount {
                dev_id: d.id,
                stated: d.stated_mapped_blocks,
                actual: d.nr_mapped,
            });
        }
    }
    inner.sb.uuid = sb.uuid;
    inner.sb.version = sb.version;
    inner.sb.time = sb.time;
    inner.sb.trans_id = sb.transaction;
    inner.sb.flags = sb.flags;
    inner.changed = true;
    let md = ThinMetadata {
        inner: RwLock::new(inner),
        commit_lock: Mutex::new(()),
        dev,
    };
    md.commit()?;
    let status = md.status();
    summary.nr_metadata_blocks = status.nr_metadata_blocks;
    summary.nr_metadata_blocks_used = status.nr_metadata_blocks - status.nr_free_metadata_blocks;
    Ok(summary)
}

/// Counts one reference to each mapped data block; fills in the summary's counts.
fn count_data_references(doc: &Document, s: &mut Store) -> Result<RestoreSummary> {
    let mut summary = RestoreSummary {
        nr_devices: doc.devices.len() as u64,
        ..RestoreSummary::default()
    };
    for d in &doc.devices {
        summary.nr_mappings += d.nr_mapped;
        for r in &d.runs {
            for b in r.data..r.data + r.len {
                s.data_sm.inc(b)?;
                if s.data_sm.get(b) == 2 {
                    summary.nr_shared_data_blocks += 1;
                }
            }
        }
    }
    summary.nr_data_blocks_used = s.data_sm.nr_allocated();
    Ok(summary)
}

/// Nodes of a tree of `n` entries whose nodes hold `per_node` each (the last of a level
/// fewer); a tree always has a root.
fn tree_nodes(n: u64, per_node: u64) -> u64 {
    let mut level = n.div_ceil(per_node).max(1);
    let mut total = level;
    while level > 1 {
        level = level.div_ceil(per_node);
        total += level;
    }
    total
}

/// At most how many nodes a tree built by inserting `n` entries has: every node but the
/// root holds at least a third of its capacity.
fn inserted_tree_nodes(n: u64, value_size: usize) -> u64 {
    tree_nodes(n, (max_entries(value_size) / 3) as u64)
}

/// At most how many metadata blocks the restored metadata takes, when `nr_overflow` data
/// blocks have counts of three or more.
fn metadata_needed(doc: &Document, nr_meta: u64, nr_overflow: u64) -> u64 {
    let leaf_capacity = max_entries(8) as u64;
    let mapping: u64 = doc
        .devices
        .iter()
        .map(|d| tree_nodes(d.nr_mapped, leaf_capacity))
        .sum();
    let nr_devices = doc.devices.len() as u64;
    let data_bitmaps = doc.superblock.nr_data_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let meta_bitmaps = nr_meta.div_ceil(ENTRIES_PER_BITMAP);
    1 // superblock
        + mapping
        + inserted_tree_nodes(nr_devices, 8)
        + inserted_tree_nodes(nr_devices, DETAILS_SIZE)
        + data_bitmaps
        + inserted_tree_nodes(data_bitmaps, INDEX_ENTRY_SIZE)
        + inserted_tree_nodes(nr_overflow, 4)
        + meta_bitmaps
        + 2 // the metadata space map's index block and ref-count tree root
}

/// Refuses, before anything is written, a restore whose metadata would not fit the device
/// with `reserve` blocks (the pool's commit reserve) still free.
fn check_space(needed: u64, reserve: u64, nr_meta: u64) -> Result<()> {
    if needed.saturating_add(reserve) <= nr_meta {
        return Ok(());
    }
    // The reserve is at most an eighth of the device, and each 16320 blocks more take one
    // more bitmap.
    let enough = (needed + needed / ENTRIES_PER_BITMAP + 2) * 8 / 7 + 1;
    if enough > MAX_METADATA_BLOCKS {
        return Err(Error::InvalidArgument(format!(
            "this restore needs up to {needed} metadata blocks, more than dm-thin's metadata \
             format can address ({MAX_METADATA_BLOCKS} blocks, with room for the pool's \
             commits): too many mappings, or a data device too large (its space map alone \
             takes one block per {ENTRIES_PER_BITMAP} data blocks)"
        )));
    }
    Err(Error::InvalidArgument(format!(
        "the metadata device is too small for this restore: it holds {nr_meta} blocks, the \
         restored metadata needs up to {needed} and the pool keeps {reserve} free for its \
         commits; use a metadata device of {enough} blocks ({} MiB) or more",
        (enough * 4096).div_ceil(1 << 20)
    )))
}

/// Zeroes block 0 and makes that durable, so that until the new superblock lands the device
/// reads as unformatted.
fn blank_superblock(dev: &dyn MetaDevice) -> Result<()> {
    let io = |op| {
        move |source| Error::Io {
            op,
            block: SUPERBLOCK_LOCATION,
            source,
        }
    };
    dev.write_block(SUPERBLOCK_LOCATION, &zeroed_block())
        .map_err(io("write"))?;
    dev.flush().map_err(io("flush"))
}

/// Builds the mapping tree of one device bottom-up; returns its root. The blocks of the new
/// nodes are added to `finished`.
fn build_mapping_tree(s: &mut Store, d: &DeviceEntry, finished: &mut Vec<u64>) -> Result<u64> {
    if d.nr_mapped == 0 {
        return btree::new_tree(s, TreeKind::MappingBottom);
    }
    let entries = d
        .runs
        .iter()
        .flat_map(|r| (0..r.len).map(move |i| (r.origin + i, pack_block_time(r.data + i, r.time))));
    let mut level = pack_level(s, NodeKind::Leaf, d.nr_mapped, entries, finished)?;
    while level.len() > 1 {
        let n = level.len() as u64;
        let children = std::mem::take(&mut level).into_iter();
        level = pack_level(s, NodeKind::Internal, n, children, finished)?;
    }
    Ok(level
        .first()
        .map(|&(_, root)| root)
        .expect("a level of a non-empty tree has a node"))
}

/// Packs `n` entries (key, 8-byte value) into as few nodes as hold them, spread evenly;
/// returns each node's first key and block.
fn pack_level(
    s: &mut Store,
    kind: NodeKind,
    n: u64,
    mut entries: impl Iterator<Item = (u64, u64)>,
    finished: &mut Vec<u64>,
) -> Result<Vec<(u64, u64)>> {
    let capacity = max_entries(8) as u64;
    let nr_nodes = n.div_ceil(capacity);
    let (base, extra) = (n / nr_nodes, n % nr_nodes);
    let mut out = Vec::with_capacity(nr_nodes as usize);
    for i in 0..nr_nodes {
        let count = base + u64::from(i < extra);
        let mut node = Node::new(kind, 8);
        node.values.reserve(count as usize * 8);
        for _ in 0..count {
            let (k, v) = entries.next().expect("as many entries as counted");
            node.keys.push(k);
            node.values.extend_from_slice(&v.to_le_bytes());
        }
        let first = *node.keys.first().expect("a node gets at least one entry");
        let b = s.new_node(node)?;
        finished.push(b);
        out.push((first, b));
    }
    Ok(out)
}

/// Writes finished mapping nodes to the device and drops them from memory.
fn spill(s: &mut Store, finished: &mut Vec<u64>) -> Result<()> {
    for chunk in finished.chunks(WRITE_BATCH) {
        let encoded: Vec<(u64, Box<MetaBlock>)> = chunk
            .iter()
            .filter_map(|&b| s.dirty.remove(&b).map(|node| (b, node.encode(b))))
            .collect();
        let refs: Vec<(u64, &MetaBlock)> = encoded.iter().map(|(b, raw)| (*b, &**raw)).collect();
        let first = refs.first().map_or(0, |r| r.0);
        s.dev.write_blocks(&refs).map_err(|source| Error::Io {
            op: "write",
            block: first,
            source,
        })?;
    }
    finished.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_sizes() {
        assert_eq!(tree_nodes(0, 252), 1);
        assert_eq!(tree_nodes(252, 252), 1);
        assert_eq!(tree_nodes(253, 252), 3);
        assert_eq!(tree_nodes(252 * 252 + 1, 252), 253 + 2 + 1);
    }
}
