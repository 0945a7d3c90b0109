//! Tests of the checker: metadata built through the public API must check clean (`clean`),
//! each kind of damage must be reported where it is (`damage`), no input may make the
//! checker panic (`robust`), and the real `thin_check` must agree with us (`oracle`).
//!
//! Randomized tests take their seed from `CHECK_SEED` when set and print it on failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod clean;
mod crash;
mod damage;
mod oracle;
mod robust;

use super::{check, CheckOptions, CheckReport, ProblemKind};
use crate::format::{
    decode_bitmap, decode_metadata_index, encode_bitmap, IndexEntry, Node, NodeKind, Superblock,
    ENTRIES_PER_BITMAP,
};
use crate::{DataBlock, FormatOptions, Lookup, ThinId, ThinMetadata, VBlock};
use block_io::{MemMetaDevice, MetaDevice};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::test_util::new_pool;

fn check_dev(dev: &MemMetaDevice) -> CheckReport {
    check(dev, &CheckOptions::default())
}

#[track_caller]
fn assert_clean(report: &CheckReport, context: &str) {
    assert!(
        report.is_clean(),
        "{context}: expected clean, got:\n{report}"
    );
}

/// Asserts a problem of `kind` at `block` and returns it.
#[track_caller]
fn expect_at(report: &CheckReport, kind: ProblemKind, block: u64) -> super::Problem {
    report
        .problems
        .iter()
        .find(|p| p.kind == kind && p.block == Some(block))
        .cloned()
        .unwrap_or_else(|| panic!("expected {kind:?} at block {block}, got:\n{report}"))
}

/// The seeds a randomized test runs: `CHECK_SEED` alone when set, else `default`.
fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("CHECK_SEED") {
        Ok(s) => vec![s.parse().expect("CHECK_SEED is a number")],
        Err(_) => default.collect(),
    }
}

/// Maps `vblock` of `thin` the way the pool does: a fresh block unless it is mapped and
/// unshared (then the write goes in place and the metadata does not change).
fn write(md: &ThinMetadata, thin: u32, vblock: u64) {
    match md.lookup(ThinId(thin), VBlock(vblock)).unwrap() {
        Lookup::Provisioned { shared: false, .. } => {}
        _ => {
            let b = md.alloc_data_block().unwrap();
            md.insert(ThinId(thin), VBlock(vblock), b).unwrap();
        }
    }
}

/// Which vblocks each thin maps.
type Model = BTreeMap<u32, BTreeSet<u64>>;

/// One random change to the pool and the model.
fn random_op(md: &ThinMetadata, model: &mut Model, rng: &mut SmallRng, vmax: u64) {
    let ids: Vec<u32> = model.keys().copied().collect();
    let r = rng.gen_range(0..100);
    if r < 4 || ids.is_empty() {
        let id = rng.gen_range(0..10);
        if let std::collections::btree_map::Entry::Vacant(e) = model.entry(id) {
            md.create_thin(ThinId(id)).unwrap();
            e.insert(BTreeSet::new());
        }
    } else if r < 9 {
        let (id, origin) = (rng.gen_range(0..10), ids[rng.gen_range(0..ids.len())]);
        if !model.contains_key(&id) {
            md.create_snap(ThinId(id), ThinId(origin)).unwrap();
            let m = model[&origin].clone();
            model.insert(id, m);
        }
    } else if r < 11 {
        let id = ids[rng.gen_range(0..ids.len())];
        md.delete_thin(ThinId(id)).unwrap();
        model.remove(&id);
    } else if r < 85 {
        let id = ids[rng.gen_range(0..ids.len())];
        let v = rng.gen_range(0..vmax);
        write(md, id, v);
        model.get_mut(&id).unwrap().insert(v);
    } else {
        let id = ids[rng.gen_range(0..ids.len())];
        let b = rng.gen_range(0..vmax);
        let e = b + rng.gen_range(1..400);
        md.remove_range(ThinId(id), VBlock(b), VBlock(e)).unwrap();
        let m = model.get_mut(&id).unwrap();
        let gone: Vec<u64> = m.range(b..e).copied().collect();
        for v in gone {
            m.remove(&v);
        }
    }
}

/// Runs `nr_ops` random operations with snapshots, deletes, discards, aborts, reopens and a
/// held metadata snapshot taken and dropped along the way; after each commit calls
/// `after_commit(dev, md, committed model, "seed S op N")`.
fn workload(
    seed: u64,
    nr_ops: usize,
    vmax: u64,
    mut after_commit: impl FnMut(&MemMetaDevice, &ThinMetadata, &Model, &str),
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (dev, mut md) = new_pool(8192, 50_000);
    let mut model = Model::new();
    let mut committed = model.clone();
    for op in 0..nr_ops {
        let r = rng.gen_range(0..100);
        if r < 90 {
            random_op(&md, &mut model, &mut rng, vmax);
            continue;
        }
        let held = md.status().held_root.is_some();
        match r {
            90 if !held => {
                md.reserve_metadata_snap().unwrap();
            }
            91 if held => md.release_metadata_snap().unwrap(),
            92 => {
                md.abort().unwrap();
                model = committed.clone();
                continue;
            }
            93 => {
                md.commit().unwrap();
                md = ThinMetadata::open(dev.clone()).unwrap();
            }
            _ => {}
        }
        md.commit().unwrap();
        committed = model.clone();
        after_commit(&dev, &md, &model, &format!("seed {seed} op {op}"));
    }
}

fn superblock(dev: &MemMetaDevice) -> Superblock {
    let mut raw = [0u8; 4096];
    dev.read_block(0, &mut raw).unwrap();
    Superblock::decode(&raw, 0).unwrap()
}

fn read_node(dev: &MemMetaDevice, b: u64, value_size: usize) -> Node {
    let mut raw = [0u8; 4096];
    dev.read_block(b, &mut raw).unwrap();
    Node::decode(&raw, b, value_size).unwrap()
}

/// Writes `node` at `b`, sealed with a correct checksum, even with its keys out of order
/// (which `Node::encode` refuses): a sorted stand-in is encoded, then the real keys go in.
fn write_node(dev: &MemMetaDevice, b: u64, node: &Node) {
    let mut sorted = node.clone();
    sorted.keys = (0..node.nr_entries() as u64).collect();
    let mut raw = sorted.encode(b);
    for (i, k) in node.keys.iter().enumerate() {
        let at = crate::format::NODE_HEADER_SIZE + 8 * i;
        raw[at..at + 8].copy_from_slice(&k.to_le_bytes());
    }
    crate::format::seal(&mut raw, crate::format::BTREE_CSUM_XOR);
    dev.patch(b, 0, &raw[..]).unwrap();
}

/// Every node of the tree at `root` as (block, node), parents before children.
fn nodes(dev: &MemMetaDevice, root: u64, value_size: usize) -> Vec<(u64, Node)> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(b) = stack.pop() {
        let n = read_node(dev, b, value_size);
        if n.kind == NodeKind::Internal {
            stack.extend((0..n.nr_entries()).rev().map(|i| n.value_u64(i)));
        }
        out.push((b, n));
    }
    out
}

/// The root of `thin`'s mapping tree.
fn thin_root(dev: &MemMetaDevice, thin: u32) -> u64 {
    let sb = superblock(dev);
    nodes(dev, sb.data_mapping_root, 8)
        .into_iter()
        .filter(|(_, n)| n.kind == NodeKind::Leaf)
        .find_map(|(_, n)| {
            n.keys
                .binary_search(&u64::from(thin))
                .ok()
                .map(|i| n.value_u64(i))
        })
        .expect("thin is in the mapping tree")
}

/// The leaves of `thin`'s mapping tree, in key order.
fn thin_leaves(dev: &MemMetaDevice, thin: u32) -> Vec<(u64, Node)> {
    nodes(dev, thin_root(dev, thin), 8)
        .into_iter()
        .filter(|(_, n)| n.kind == NodeKind::Leaf)
        .collect()
}

/// Where each bitmap of a space map lives: (metadata index block or data index leaf, entries).
fn metadata_bitmaps(dev: &MemMetaDevice) -> Vec<IndexEntry> {
    let sb = superblock(dev);
    let root = sb.metadata_sm_root;
    let mut raw = [0u8; 4096];
    dev.read_block(root.bitmap_root, &mut raw).unwrap();
    let n = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    decode_metadata_index(&raw, root.bitmap_root, n).unwrap()
}

fn data_bitmaps(dev: &MemMetaDevice) -> Vec<IndexEntry> {
    let sb = superblock(dev);
    nodes(dev, sb.data_sm_root.bitmap_root, 16)
        .into_iter()
        .filter(|(_, n)| n.kind == NodeKind::Leaf)
        .flat_map(|(_, n)| (0..n.nr_entries()).map(move |i| IndexEntry::decode(n.value(i))))
        .collect()
}

/// Sets the 2-bit count of entry `entry` of the bitmap at `loc`, resealed.
fn set_bitmap_count(dev: &MemMetaDevice, loc: u64, entry: u64, v: u32) {
    let mut raw = [0u8; 4096];
    dev.read_block(loc, &mut raw).unwrap();
    let mut bits = decode_bitmap(&raw, loc).unwrap();
    crate::format::bitmap_set(&mut bits[..], entry, v);
    dev.patch(loc, 0, &encode_bitmap(&bits, loc)[..]).unwrap();
}

fn bitmap_count(dev: &MemMetaDevice, loc: u64, entry: u64) -> u32 {
    let mut raw = [0u8; 4096];
    dev.read_block(loc, &mut raw).unwrap();
    crate::format::bitmap_get(&decode_bitmap(&raw, loc).unwrap()[..], entry)
}

/// The data block `vblock` of `thin` maps to.
fn mapped(md: &ThinMetadata, thin: u32, vblock: u64) -> DataBlock {
    match md.lookup(ThinId(thin), VBlock(vblock)).unwrap() {
        Lookup::Provisioned { data_block, .. } => data_block,
        Lookup::Unprovisioned => panic!("thin {thin} vblock {vblock} is not mapped"),
    }
}

/// A pool with thin 1 mapping the even vblocks `0, 2, .., 2 * (n - 1)`, committed.
fn pool_with_thin(n: u64) -> (Arc<MemMetaDevice>, ThinMetadata) {
    let (dev, md) = new_pool(4096, 100_000);
    md.create_thin(ThinId(1)).unwrap();
    for v in 0..n {
        write(&md, 1, 2 * v);
    }
    md.commit().unwrap();
    (dev, md)
}
