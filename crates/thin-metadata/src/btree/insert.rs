//! Insertion: one top-down pass that copies the path and splits full nodes before entering
//! them, so a split never has to propagate upwards.

use super::{dec_value, redistribute, shadow, shadow_child, too_deep, TreeKind, MAX_HEIGHT};
use crate::error::{Error, Result};
use crate::format::{Node, NodeKind};
use crate::store::Store;

/// Inserts or overwrites `key` in the tree at `root`; returns the new root and whether the
/// key is new. The tree takes over the references `value` holds. When an existing value is
/// overwritten its references are released if `dec_old` (callers that already moved them
/// elsewhere, such as the commit writing a thin's new root, pass false).
pub(crate) fn insert(
    s: &mut Store,
    root: u64,
    key: u64,
    value: &[u8],
    tree: TreeKind,
    dec_old: bool,
) -> Result<(u64, bool)> {
    assert_eq!(
        value.len(),
        tree.value_size(),
        "value of the wrong size for {tree:?}"
    );
    let root = shadow(s, root, tree)?;
    if s.dirty_node(root).is_full() {
        split_beneath(s, root)?;
    }
    let mut b = root;
    for _ in 0..MAX_HEIGHT {
        let node = s.node_mut(b);
        match node.kind {
            NodeKind::Leaf => match node.keys.binary_search(&key) {
                Ok(i) => {
                    let old = node.value(i).to_vec();
                    node.set_value(i, value);
                    if dec_old {
                        dec_value(s, tree, &old)?;
                    }
                    return Ok((root, false));
                }
                Err(i) => {
                    node.insert_at(i, key, value);
                    return Ok((root, true));
                }
            },
            NodeKind::Internal => {
                if node.nr_entries() == 0 {
                    return Err(Error::corrupt(b, "internal btree node has no entries"));
                }
                let i = match node.lower_bound(key) {
                    Some(i) => i,
                    None => {
                        // The key is below everything: lower this child's bound.
                        node.keys[0] = key;
                        0
                    }
                };
                let c = shadow_child(s, b, i, tree)?;
                b = if s.dirty_node(c).is_full() {
                    make_room(s, b, i, c, key, tree)?
                } else {
                    c
                };
            }
        }
    }
    Err(too_deep(root, &[b]))
}

/// A sibling takes part in rebalancing only if that frees at least this many slots' worth
/// of room (half of it ends up in the full child); below it, splitting is cheaper.
const MIN_SIBLING_ROOM: usize = 8;

/// Makes room in the full child `c` (entry `i` of `parent`): share entries with a sibling
/// that has room, else split. Sharing first is what keeps leaves nearly full under
/// sequential inserts (a plain half split would leave every leaf half empty), the same
/// choice as the kernel's `rebalance_or_split`. Returns the child that now covers `key`.
fn make_room(
    s: &mut Store,
    parent: u64,
    i: usize,
    c: u64,
    key: u64,
    tree: TreeKind,
) -> Result<u64> {
    let nr_children = s.dirty_node(parent).nr_entries();
    let has_room = |s: &Store, j: usize| -> Result<bool> {
        let n = s.read_node(s.dirty_node(parent).value_u64(j), tree.value_size())?;
        Ok(n.max_entries() - n.nr_entries() >= MIN_SIBLING_ROOM)
    };
    if i > 0 && has_room(s, i - 1)? {
        let l = shadow_child(s, parent, i - 1, tree)?;
        return Ok(redistribute(s, parent, i - 1, l, c, key));
    }
    if i + 1 < nr_children && has_room(s, i + 1)? {
        let r = shadow_child(s, parent, i + 1, tree)?;
        return Ok(redistribute(s, parent, i, c, r, key));
    }
    let sibling = split_child(s, parent, i, c)?;
    Ok(if key >= s.dirty_node(sibling).keys[0] {
        sibling
    } else {
        c
    })
}

/// Splits the full root in place: its entries move to two new children and it becomes an
/// internal node pointing at them, so the root's block number does not change.
fn split_beneath(s: &mut Store, root: u64) -> Result<()> {
    let node = s.node_mut(root);
    let mut left = std::mem::replace(node, Node::new(NodeKind::Internal, 8));
    let right = left.split_off(left.nr_entries() / 2);
    let (lkey, rkey) = (left.keys[0], right.keys[0]);
    let l = s.new_node(left)?;
    let r = s.new_node(right)?;
    let node = s.node_mut(root);
    node.insert_at(0, lkey, &l.to_le_bytes());
    node.insert_at(1, rkey, &r.to_le_bytes());
    Ok(())
}

/// Splits the full child `c` (entry `i` of `parent`) into two, adding the new right half as
/// entry `i + 1` of `parent`. Returns the right half's block.
fn split_child(s: &mut Store, parent: u64, i: usize, c: u64) -> Result<u64> {
    let node = s.node_mut(c);
    let at = node.nr_entries() / 2;
    let right = node.split_off(at);
    let rkey = right.keys[0];
    let r = s.new_node(right)?;
    s.node_mut(parent).insert_at(i + 1, rkey, &r.to_le_bytes());
    Ok(r)
}
