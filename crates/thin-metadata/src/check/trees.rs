//! The pool's own trees: device details and the two-level mapping tree, and how they agree.
//!
//! Invariants: a data block is counted once per mapping-tree leaf that holds it, because
//! leaves are visited once (a leaf shared by snapshots holds one reference to each of its
//! data blocks; sharing is expressed by the leaf's metadata count). A thin's number of
//! mappings, in contrast, counts every leaf of its tree, shared or not, and is compared with
//! its `mapped_blocks` only when its whole tree could be read.

use super::node::{first_unordered_key, parse_node, Tree};
use super::report::ProblemKind;
use super::walk::{Leaf, Walker, MAX_DEPTH};
use crate::format::{get_u64, unpack_block_time, DeviceDetails, NodeKind};
use crate::types::MAX_THIN_ID;
use std::collections::{BTreeMap, HashSet};

/// What the thins of one superblock (current or held copy) add up to.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ThinTotals {
    pub nr_thins: u64,
    pub nr_mappings: u64,
}

/// Walks the details tree and the mapping tree, checking and counting every node, every
/// bottom-level tree (unless `skip_mappings`) and every data block mapped.
pub(super) fn walk(w: &mut Walker<'_>, details_root: u64, mapping_root: u64, skip_mappings: bool) {
    w.visit_root(details_root, Tree::Details, &mut |_, _| {});
    w.visit_root(mapping_root, Tree::MappingTop, &mut |w, leaf| {
        for (i, &key) in leaf.node.keys.iter().enumerate() {
            let root = get_u64(leaf.node.value(i), 0);
            if skip_mappings {
                // The root's reference is still the top-level leaf's to count.
                if w.in_meta_area(root) {
                    w.meta.inc(root);
                }
                continue;
            }
            let saved = w.thin;
            w.thin = u32::try_from(key).ok();
            w.visit_root(root, Tree::MappingBottom, &mut bottom_leaf);
            w.thin = saved;
        }
    });
}

/// Counts the data blocks of a bottom-level leaf and checks that they exist.
fn bottom_leaf(w: &mut Walker<'_>, leaf: &Leaf<'_>) {
    let mut first_bad = None;
    let mut nr_bad = 0u64;
    for (i, &vblock) in leaf.node.keys.iter().enumerate() {
        let (data_block, _time) = unpack_block_time(get_u64(leaf.node.value(i), 0));
        if !w.data.inc(data_block) {
            nr_bad += 1;
            first_bad.get_or_insert((vblock, data_block));
        }
    }
    if let Some((vblock, data_block)) = first_bad {
        let detail = format!(
            "{nr_bad} mapping(s) point past the end of the data device ({} blocks), the \
             first: virtual block {vblock} -> data block {data_block}",
            w.data.nr_blocks()
        );
        let mut p = w.problem(Some(leaf.block), ProblemKind::OutOfRange, None, detail);
        p.data_block = Some(data_block);
        w.problems.push(p);
    }
}

/// Compares the device details with the mapping tree: the same thins in both, each thin's
/// `mapped_blocks` equal to its mappings, thin ids within dm-thin's range.
pub(super) fn check_thins(
    w: &mut Walker<'_>,
    details_root: u64,
    mapping_root: u64,
    skip_mappings: bool,
) -> ThinTotals {
    let mut details = BTreeMap::new();
    collect(w, details_root, Tree::Details, &mut |k, v| {
        details.insert(k, DeviceDetails::decode(v));
    });
    let mut roots = BTreeMap::new();
    collect(w, mapping_root, Tree::MappingTop, &mut |k, v| {
        roots.insert(k, get_u64(v, 0));
    });
    let mut totals = ThinTotals {
        nr_thins: details.len() as u64,
        nr_mappings: 0,
    };
    let saved = w.thin;
    for &id in details
        .keys()
        .chain(roots.keys().filter(|id| !details.contains_key(id)))
    {
        w.thin = u32::try_from(id).ok();
        if id > u64::from(MAX_THIN_ID) {
            let detail = format!("thin id {id} is above dm-thin's largest id {MAX_THIN_ID}");
            w.report(None, ProblemKind::OutOfRange, None, detail);
        }
        let (d, root) = (details.get(&id), roots.get(&id));
        let (d, root) = match (d, root) {
            (Some(d), Some(&root)) => (d, root),
            (Some(_), None) => {
                let detail = format!("thin {id} has device details but no mapping tree");
                w.report(
                    Some(details_root),
                    ProblemKind::DetailsMismatch,
                    None,
                    detail,
                );
                continue;
            }
            (None, _) => {
                let detail = format!("thin {id} has a mapping tree but no device details");
                w.report(
                    Some(mapping_root),
                    ProblemKind::DetailsMismatch,
                    None,
                    detail,
                );
                continue;
            }
        };
        if skip_mappings {
            continue;
        }
        let Some(s) = w.summary_of(root, Tree::MappingBottom) else {
            continue;
        };
        totals.nr_mappings = totals.nr_mappings.saturating_add(s.nr_leaf_entries);
        if s.complete && s.nr_leaf_entries != d.mapped_blocks {
            let detail = format!(
                "device details say {} mapped blocks, the mapping tree holds {}",
                d.mapped_blocks, s.nr_leaf_entries
            );
            w.report(Some(root), ProblemKind::MappedBlocksMismatch, None, detail);
        }
    }
    w.thin = saved;
    totals
}

/// Calls `f(key, value)` for each entry of the tree at `root`, in key order, without
/// counting or reporting anything: nodes that `visit` found damaged (and reported) are
/// skipped. For trees shared with the held snapshot, whose leaves `visit` shows only once.
fn collect(w: &mut Walker<'_>, root: u64, tree: Tree, f: &mut dyn FnMut(u64, &[u8])) {
    let mut seen = HashSet::new();
    let mut stack = vec![(root, 0usize)];
    while let Some((b, depth)) = stack.pop() {
        if depth >= MAX_DEPTH || !w.in_meta_area(b) || !seen.insert(b) {
            continue;
        }
        if w.known_unusable(b, tree) {
            continue;
        }
        let Ok(raw) = w.read(b) else { continue };
        let Ok(node) = parse_node(&raw, b, tree.value_size()) else {
            continue;
        };
        if first_unordered_key(&node.keys).is_some() {
            continue;
        }
        match node.kind {
            NodeKind::Internal => {
                // Pushed last to first, so children are taken in key order.
                for i in (0..node.nr_entries()).rev() {
                    stack.push((node.value_u64(i), depth + 1));
                }
            }
            NodeKind::Leaf => {
                for (i, &key) in node.keys.iter().enumerate() {
                    f(key, node.value(i));
                }
            }
        }
    }
}
