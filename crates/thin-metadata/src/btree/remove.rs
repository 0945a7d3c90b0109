//! Removal: one top-down pass that, before entering a child, makes sure it holds more than
//! the minimum number of entries (merging with or borrowing from a sibling), so that taking
//! entries out of the leaf never leaves an underfull node behind.

use super::MAX_HEIGHT;
use super::{child_index, dec_value, lookup, next_entry, redistribute, shadow, shadow_child};
use super::{too_deep, TreeKind, Value};
use crate::error::{Error, Result};
use crate::format::NodeKind;
use crate::store::Store;

/// Removes `key` from the tree at `root`. Returns the new root and the removed value; the
/// value's references are released if `dec`.
pub(crate) fn remove(
    s: &mut Store,
    root: u64,
    key: u64,
    tree: TreeKind,
    dec: bool,
) -> Result<(u64, Option<Value>)> {
    if lookup(s, root, key, tree)?.is_none() {
        return Ok((root, None));
    }
    let mut removed = None;
    let root = remove_run(s, root, key, key.saturating_add(1), tree, dec, |_, v| {
        removed = Some(Value::new(v))
    })?;
    Ok((root, removed))
}

/// Removes every key in `[begin, end)`; returns the new root, how many were removed, and
/// whether the whole range is done. Between batches (each leaves a complete, valid tree) it
/// asks `keep_going`, so a caller can stop before a huge range uses up its metadata space.
pub(crate) fn remove_range(
    s: &mut Store,
    mut root: u64,
    begin: u64,
    end: u64,
    tree: TreeKind,
    dec: bool,
    mut keep_going: impl FnMut(&Store) -> bool,
) -> Result<(u64, u64, bool)> {
    let mut nr_removed = 0u64;
    let mut from = begin;
    while from < end {
        if !keep_going(s) {
            return Ok((root, nr_removed, false));
        }
        let Some((k, _)) = next_entry(s, root, tree, from)? else {
            break;
        };
        if k >= end {
            break;
        }
        root = remove_run(s, root, k, end, tree, dec, |_, _| nr_removed += 1)?;
        // `remove_run` always removes `first`, so even u64::MAX (end exclusive) goes.
        match k.checked_add(1) {
            Some(next) => from = next,
            None => break,
        }
    }
    Ok((root, nr_removed, true))
}

/// Descends to the leaf holding `first` (which must exist) and removes the run of keys in
/// `[first, end)` that follows it in that leaf, as far as the leaf can lose entries without
/// becoming underfull (at least `first` itself). `on_removed` sees each removed entry.
fn remove_run(
    s: &mut Store,
    root: u64,
    first: u64,
    end: u64,
    tree: TreeKind,
    dec: bool,
    mut on_removed: impl FnMut(u64, &[u8]),
) -> Result<u64> {
    let root = shadow(s, root, tree)?;
    let mut b = root;
    let mut depth = 0;
    loop {
        if depth >= MAX_HEIGHT {
            return Err(too_deep(root, &[b]));
        }
        depth += 1;
        let node = s.dirty_node(b);
        if node.kind == NodeKind::Leaf {
            let i = node.keys.binary_search(&first).map_err(|_| {
                Error::corrupt(
                    b,
                    format!("key {first} vanished from its leaf during removal"),
                )
            })?;
            let min = if b == root { 0 } else { node.max_entries() / 3 };
            let in_range = node.keys[i..].partition_point(|&k| k < end);
            let n = in_range.min(node.nr_entries().saturating_sub(min)).max(1);
            let node = s.node_mut(b);
            let mut values = Vec::with_capacity(n);
            for _ in 0..n {
                values.push((node.keys[i], Value::new(node.value(i))));
                node.remove_at(i);
            }
            for (k, v) in values {
                on_removed(k, v.as_bytes());
                if dec {
                    dec_value(s, tree, v.as_bytes())?;
                }
            }
            break;
        }
        let i = child_index(node, b, first)?
            .ok_or_else(|| Error::corrupt(b, format!("key {first} below the node's range")))?;
        b = make_child_removable(s, b, i, first, tree)?;
    }
    collapse_root(s, root)
}

/// Shadows child `i` of `parent` and, if it holds no more than the minimum, merges it with a
/// sibling or moves entries over from one. Returns the (shadowed) child that now covers `key`.
fn make_child_removable(
    s: &mut Store,
    parent: u64,
    i: usize,
    key: u64,
    tree: TreeKind,
) -> Result<u64> {
    let c = shadow_child(s, parent, i, tree)?;
    let node = s.dirty_node(c);
    let min = node.max_entries() / 3;
    let nr_siblings = s.dirty_node(parent).nr_entries();
    if node.nr_entries() > min || nr_siblings < 2 {
        return Ok(c);
    }
    // Pair the child with its right sibling, or its left one when it is the last child.
    let li = if i + 1 < nr_siblings { i } else { i - 1 };
    let l = shadow_child(s, parent, li, tree)?;
    let r = shadow_child(s, parent, li + 1, tree)?;
    let (nl, nr) = (s.dirty_node(l).nr_entries(), s.dirty_node(r).nr_entries());
    let max = s.dirty_node(l).max_entries();
    if nl + nr <= max {
        let mut right =
            std::mem::replace(s.node_mut(r), crate::format::Node::new(NodeKind::Leaf, 8));
        s.node_mut(l).append(&mut right);
        s.node_mut(parent).remove_at(li + 1);
        // The right node was copied in this transaction, so its only reference is gone now.
        s.dec_meta(r)?;
        return Ok(l);
    }
    Ok(redistribute(s, parent, li, l, r, key))
}

/// While the root is an internal node with a single child, the child becomes the root.
fn collapse_root(s: &mut Store, mut root: u64) -> Result<u64> {
    loop {
        let node = s.dirty_node(root);
        if node.kind != NodeKind::Internal || node.nr_entries() != 1 {
            return Ok(root);
        }
        let child = node.value_u64(0);
        // The old root was copied in this transaction (count 1): freeing it hands its one
        // reference to the child over to whoever references the root.
        s.dec_meta(root)?;
        root = child;
        if !s.dirty.contains_key(&root) || s.meta_sm.get(root) != 1 {
            // The child may be shared with another tree; it is only read from here on, and
            // the next writer will shadow it.
            return Ok(root);
        }
    }
}
