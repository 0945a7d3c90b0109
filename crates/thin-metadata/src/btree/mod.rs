//! Copy-on-write btrees in dm-thin's node format.
//!
//! Every tree a pool holds is one of `TreeKind`, which fixes the value size and what a value
//! references. Sharing is by reference count (persistent-data's scheme): a node reachable from
//! several parents has a metadata count above one; writing to it first copies it to a new
//! block ("shadowing"), and if it was shared the copy takes a reference to each of its
//! children (child nodes, or the data blocks / subtrees its values name).
//!
//! Invariants kept by insert and remove (and checked by `check`):
//! - keys are strictly increasing within a node and across leaves;
//! - an internal node's key is <= every key of its child and > every key of the previous
//!   child;
//! - every node except a root holds at least `max_entries / 3` entries;
//! - descent is bounded by `MAX_HEIGHT`, so a cycle in damaged metadata is an error.

mod insert;
mod remove;

pub(crate) use insert::insert;
pub(crate) use remove::{remove, remove_range};

use crate::error::{Error, Result};
use crate::format::{unpack_block_time, Node, NodeKind, DETAILS_SIZE, INDEX_ENTRY_SIZE};
use crate::store::Store;
use std::sync::Arc;

/// No tree is deeper than this: with at least 84 entries per node that is more entries than
/// fit in any metadata device, so a deeper descent means a cycle.
pub const MAX_HEIGHT: usize = 16;

/// The kinds of tree a pool's metadata holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// Thin id -> root of that thin's mapping tree.
    MappingTop,
    /// Virtual block -> (data block << 24 | time).
    MappingBottom,
    /// Thin id -> device details.
    Details,
    /// Bitmap index -> index entry (the data space map's index).
    SmIndex,
    /// Block -> reference count (counts above two).
    RefCount,
}

impl TreeKind {
    /// Size of a leaf value.
    pub const fn value_size(self) -> usize {
        match self {
            TreeKind::MappingTop | TreeKind::MappingBottom => 8,
            TreeKind::Details => DETAILS_SIZE,
            TreeKind::SmIndex => INDEX_ENTRY_SIZE,
            TreeKind::RefCount => 4,
        }
    }
}

/// A copy of one leaf value (at most 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value {
    bytes: [u8; DETAILS_SIZE],
    len: usize,
}

impl Value {
    pub fn new(v: &[u8]) -> Self {
        let mut bytes = [0u8; DETAILS_SIZE];
        let len = v.len().min(DETAILS_SIZE);
        bytes[..len].copy_from_slice(&v[..len]);
        Value { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn as_u64(&self) -> u64 {
        crate::format::get_u64(&self.bytes, 0)
    }
}

/// Adds the references a leaf value of `tree` holds (when the leaf holding it is copied).
fn inc_value(s: &mut Store, tree: TreeKind, v: &[u8]) -> Result<()> {
    let v = crate::format::get_u64(v, 0);
    match tree {
        TreeKind::MappingBottom => s.data_sm.inc(unpack_block_time(v).0),
        TreeKind::MappingTop => s.meta_sm.inc(v),
        TreeKind::Details | TreeKind::SmIndex | TreeKind::RefCount => Ok(()),
    }
}

/// Releases the references a leaf value of `tree` holds.
pub(crate) fn dec_value(s: &mut Store, tree: TreeKind, v: &[u8]) -> Result<()> {
    let v = crate::format::get_u64(v, 0);
    match tree {
        TreeKind::MappingBottom => s.data_sm.dec(unpack_block_time(v).0).map(drop),
        TreeKind::MappingTop => dec_tree(s, v, TreeKind::MappingBottom),
        TreeKind::Details | TreeKind::SmIndex | TreeKind::RefCount => Ok(()),
    }
}

/// Makes node `b` writable in this transaction, returning where the writable copy lives
/// (`b` itself when it was already written in this transaction).
pub(crate) fn shadow(s: &mut Store, b: u64, tree: TreeKind) -> Result<u64> {
    // A node written in this transaction may be changed in place, unless a snapshot has
    // shared it since: then it belongs to both trees and must be copied like any other.
    if s.dirty.contains_key(&b) && s.meta_sm.get(b) == 1 {
        return Ok(b);
    }
    let node = s.read_node(b, tree.value_size())?;
    let copy = s.new_node((*node).clone())?;
    if s.meta_sm.get(b) > 1 {
        inc_children(s, &node, tree)?;
    }
    s.dec_meta(b)?;
    Ok(copy)
}

fn inc_children(s: &mut Store, node: &Node, tree: TreeKind) -> Result<()> {
    for i in 0..node.nr_entries() {
        match node.kind {
            NodeKind::Internal => s.meta_sm.inc(node.value_u64(i))?,
            NodeKind::Leaf => inc_value(s, tree, node.value(i))?,
        }
    }
    Ok(())
}

/// Entry `i` of dirty node `parent` made writable: returns where the child's copy lives and
/// points the parent at it.
pub(crate) fn shadow_child(s: &mut Store, parent: u64, i: usize, tree: TreeKind) -> Result<u64> {
    let child = s.dirty_node(parent).value_u64(i);
    let c = shadow(s, child, tree)?;
    if c != child {
        s.node_mut(parent).set_value(i, &c.to_le_bytes());
    }
    Ok(c)
}

/// Evens out the entries of the writable siblings `l` and `r`, entries `li` and `li + 1` of
/// `parent`, and updates the parent's key for `r`. Returns the one that now covers `key`.
pub(crate) fn redistribute(s: &mut Store, parent: u64, li: usize, l: u64, r: u64, key: u64) -> u64 {
    let (nl, nr) = (s.dirty_node(l).nr_entries(), s.dirty_node(r).nr_entries());
    let target_left = (nl + nr) / 2;
    if nl > target_left {
        let mut moved = s.node_mut(l).split_off(target_left);
        let right = s.node_mut(r);
        moved.append(right);
        *right = moved;
    } else if nl < target_left {
        let right = s.node_mut(r);
        let mut rest = right.split_off(target_left - nl);
        std::mem::swap(right, &mut rest);
        // `rest` now holds the entries moving left.
        s.node_mut(l).append(&mut rest);
    }
    let rkey = s.dirty_node(r).keys[0];
    s.node_mut(parent).keys[li + 1] = rkey;
    if key >= rkey {
        r
    } else {
        l
    }
}

/// A new empty tree; returns its root.
pub(crate) fn new_tree(s: &mut Store, tree: TreeKind) -> Result<u64> {
    s.new_node(Node::new(NodeKind::Leaf, tree.value_size()))
}

fn child_index(node: &Node, b: u64, key: u64) -> Result<Option<usize>> {
    if node.nr_entries() == 0 {
        return Err(Error::corrupt(b, "internal btree node has no entries"));
    }
    Ok(node.lower_bound(key))
}

/// Looks `key` up in the tree at `root`. Returns the value and whether any node on the path
/// is shared (its metadata count is above one).
pub(crate) fn lookup(
    s: &Store,
    root: u64,
    key: u64,
    tree: TreeKind,
) -> Result<Option<(Value, bool)>> {
    descend(s, root, key, tree, true)
}

/// `lookup` without the sharing test: the value only, for readers, who need not know
/// whether the path or the block is shared (no space map is consulted).
pub(crate) fn lookup_value(
    s: &Store,
    root: u64,
    key: u64,
    tree: TreeKind,
) -> Result<Option<Value>> {
    Ok(descend(s, root, key, tree, false)?.map(|(v, _)| v))
}

/// Walks from `root` to the leaf that would hold `key`; `shared` (if `want_shared`) is
/// whether any node on the way has more than one reference. The path is kept on the stack
/// for error reports: a lookup allocates nothing.
fn descend(
    s: &Store,
    root: u64,
    key: u64,
    tree: TreeKind,
    want_shared: bool,
) -> Result<Option<(Value, bool)>> {
    let mut b = root;
    let mut shared = false;
    let mut path = [0u64; MAX_HEIGHT];
    for depth in 0..MAX_HEIGHT {
        let node = s
            .read_node(b, tree.value_size())
            .map_err(|e| with_path(e, &path[..depth]))?;
        if want_shared {
            shared |= s.meta_sm.get(b) > 1;
        }
        path[depth] = b;
        match node.kind {
            NodeKind::Leaf => {
                return Ok(node
                    .keys
                    .binary_search(&key)
                    .ok()
                    .map(|i| (Value::new(node.value(i)), shared)))
            }
            NodeKind::Internal => match child_index(&node, b, key)? {
                None => return Ok(None),
                Some(i) => b = node.value_u64(i),
            },
        }
    }
    Err(too_deep(root, &path))
}

pub(crate) fn too_deep(root: u64, path: &[u64]) -> Error {
    Error::Corrupt {
        block: root,
        path: path.to_vec(),
        reason: format!("btree deeper than {MAX_HEIGHT} levels (a cycle?)"),
    }
}

/// Adds the root-to-node path to a corruption error that has none.
pub(crate) fn with_path(e: Error, path: &[u64]) -> Error {
    match e {
        Error::Corrupt {
            block,
            path: p,
            reason,
        } if p.is_empty() => Error::Corrupt {
            block,
            path: path.to_vec(),
            reason,
        },
        e => e,
    }
}

/// Calls `f(key, value)` for every entry with `key >= from`, in key order, until `f`
/// returns false.
pub(crate) fn walk_from(
    s: &Store,
    root: u64,
    tree: TreeKind,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<()> {
    // Each stack entry is a node and the index of the next child or entry to visit.
    let mut stack: Vec<(Arc<Node>, usize, u64)> = Vec::new();
    let first = s.read_node(root, tree.value_size())?;
    let start = start_index(&first, from);
    stack.push((first, start, root));
    while let Some((node, i, b)) = stack.pop() {
        if i >= node.nr_entries() {
            continue;
        }
        match node.kind {
            NodeKind::Leaf => {
                for j in i..node.nr_entries() {
                    if node.keys[j] >= from && !f(node.keys[j], node.value(j))? {
                        return Ok(());
                    }
                }
            }
            NodeKind::Internal => {
                if stack.len() >= MAX_HEIGHT {
                    let path: Vec<u64> = stack.iter().map(|e| e.2).collect();
                    return Err(too_deep(root, &path));
                }
                let child_b = node.value_u64(i);
                stack.push((node, i + 1, b));
                let child = s.read_node(child_b, tree.value_size()).map_err(|e| {
                    let path: Vec<u64> = stack.iter().map(|e| e.2).collect();
                    with_path(e, &path)
                })?;
                let start = start_index(&child, from);
                stack.push((child, start, child_b));
            }
        }
    }
    Ok(())
}

/// Where to start visiting `node` for keys `>= from`.
fn start_index(node: &Node, from: u64) -> usize {
    match node.kind {
        NodeKind::Leaf => node.keys.partition_point(|&k| k < from),
        NodeKind::Internal => node.lower_bound(from).unwrap_or(0),
    }
}

/// The first entry with key `>= from`.
pub(crate) fn next_entry(
    s: &Store,
    root: u64,
    tree: TreeKind,
    from: u64,
) -> Result<Option<(u64, Value)>> {
    let mut found = None;
    walk_from(s, root, tree, from, |k, v| {
        found = Some((k, Value::new(v)));
        Ok(false)
    })?;
    Ok(found)
}

/// Drops one reference to the tree at `root`; a node left unreferenced releases everything
/// it references in turn (dm-thin's `dm_btree_del`).
pub(crate) fn dec_tree(s: &mut Store, root: u64, tree: TreeKind) -> Result<()> {
    let mut stack = vec![(root, tree, 0usize)];
    while let Some((b, t, depth)) = stack.pop() {
        if s.meta_sm.get(b) > 1 {
            s.dec_meta(b)?;
            continue;
        }
        if depth >= MAX_HEIGHT * 2 {
            return Err(too_deep(root, &[b]));
        }
        let node = s.read_node(b, t.value_size())?;
        for i in 0..node.nr_entries() {
            match (node.kind, t) {
                (NodeKind::Internal, _) => stack.push((node.value_u64(i), t, depth + 1)),
                (NodeKind::Leaf, TreeKind::MappingTop) => {
                    stack.push((node.value_u64(i), TreeKind::MappingBottom, depth + 1))
                }
                (NodeKind::Leaf, _) => dec_value(s, t, node.value(i))?,
            }
        }
        s.dec_meta(b)?;
    }
    Ok(())
}
