//! Btree nodes: a 32-byte header, then `max_entries` keys, then `max_entries` values.
//!
//! Invariants checked on decode: checksum and block number, exactly one of the internal and
//! leaf flags, the value size the tree expects, `max_entries` as dm-thin computes it,
//! `nr_entries <= max_entries`, and keys strictly increasing.

use super::{get_u32, get_u64, put_u32, put_u64, seal, verify, zeroed_block, MetaBlock};
use super::{BTREE_CSUM_XOR, META_BLOCK_SIZE};
use crate::error::{Error, Result};

const CSUM: usize = 0;
const FLAGS: usize = CSUM + 4;
const BLOCKNR: usize = FLAGS + 4;
const NR_ENTRIES: usize = BLOCKNR + 8;
const MAX_ENTRIES: usize = NR_ENTRIES + 4;
const VALUE_SIZE: usize = MAX_ENTRIES + 4;
const PADDING: usize = VALUE_SIZE + 4;
/// Size of a node header.
pub const NODE_HEADER_SIZE: usize = PADDING + 4;
const _: () = assert!(NODE_HEADER_SIZE == 32);

const INTERNAL_FLAG: u32 = 1;
const LEAF_FLAG: u32 = 2;

/// dm-thin's capacity of a node: as many key+value pairs as fit, rounded down to a multiple
/// of three (so that three-way rebalancing divides evenly).
pub const fn max_entries(value_size: usize) -> usize {
    let total = (META_BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size);
    3 * (total / 3)
}

const _: () = assert!(max_entries(8) == 252);
const _: () = assert!(max_entries(24) == 126);
const _: () = assert!(max_entries(16) == 168);
const _: () = assert!(max_entries(4) == 336);

/// Whether a node holds child pointers or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Values are child block numbers (8 bytes).
    Internal,
    /// Values are the tree's values.
    Leaf,
}

/// A decoded btree node. `values` holds `keys.len() * value_size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub value_size: usize,
    pub keys: Vec<u64>,
    pub values: Vec<u8>,
}

impl Node {
    /// An empty node.
    pub fn new(kind: NodeKind, value_size: usize) -> Self {
        let cap = max_entries(value_size);
        Node {
            kind,
            value_size,
            keys: Vec::with_capacity(cap),
            values: Vec::new(),
        }
    }

    /// Number of entries.
    pub fn nr_entries(&self) -> usize {
        self.keys.len()
    }

    /// Capacity of this node.
    pub fn max_entries(&self) -> usize {
        max_entries(self.value_size)
    }

    /// True when no entry can be added.
    pub fn is_full(&self) -> bool {
        self.keys.len() >= self.max_entries()
    }

    /// The value bytes of entry `i` (empty if out of range).
    pub fn value(&self, i: usize) -> &[u8] {
        let vs = self.value_size;
        self.values.get(i * vs..(i + 1) * vs).unwrap_or(&[])
    }

    /// Entry `i`'s value as a u64 (child pointers, mapping values).
    pub fn value_u64(&self, i: usize) -> u64 {
        get_u64(self.value(i), 0)
    }

    /// Overwrites the value of entry `i`.
    pub fn set_value(&mut self, i: usize, v: &[u8]) {
        let vs = self.value_size;
        if let Some(s) = self.values.get_mut(i * vs..(i + 1) * vs) {
            s.copy_from_slice(v);
        }
    }

    /// Inserts an entry at position `i`.
    pub fn insert_at(&mut self, i: usize, key: u64, v: &[u8]) {
        assert!(v.len() == self.value_size, "value of the wrong size");
        assert!(!self.is_full(), "insert into a full node");
        self.keys.insert(i, key);
        let at = i * self.value_size;
        self.values.splice(at..at, v.iter().copied());
    }

    /// Removes entry `i`, returning nothing (callers read the value first).
    pub fn remove_at(&mut self, i: usize) {
        self.keys.remove(i);
        let at = i * self.value_size;
        self.values.drain(at..at + self.value_size);
    }

    /// Splits off entries `at..` into a new node of the same kind.
    pub fn split_off(&mut self, at: usize) -> Node {
        let keys = self.keys.split_off(at);
        let values = self.values.split_off(at * self.value_size);
        Node {
            kind: self.kind,
            value_size: self.value_size,
            keys,
            values,
        }
    }

    /// Appends all entries of `other`.
    pub fn append(&mut self, other: &mut Node) {
        self.keys.append(&mut other.keys);
        self.values.append(&mut other.values);
    }

    /// Index of the last key `<= key`, if any.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        match self.keys.binary_search(&key) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }

    /// Encodes the node for block `location`, sealed.
    pub fn encode(&self, location: u64) -> Box<MetaBlock> {
        let mut b = zeroed_block();
        self.encode_into(&mut b, location);
        b
    }

    /// Encodes the node into `b` for block `location`, sealed.
    pub fn encode_into(&self, b: &mut MetaBlock, location: u64) {
        // Validation before every write: a node that breaks the format must never reach the
        // disk, whatever bug produced it. Cheap next to the checksum, so kept in release.
        let max = self.max_entries();
        assert!(
            self.keys.len() <= max,
            "node for block {location} is overfull"
        );
        assert_eq!(
            self.values.len(),
            self.keys.len() * self.value_size,
            "node values misaligned"
        );
        assert!(
            self.kind == NodeKind::Leaf || self.value_size == 8,
            "internal node with {}-byte values",
            self.value_size
        );
        assert!(
            self.keys.windows(2).all(|w| w[0] < w[1]),
            "node for block {location} has keys out of order"
        );
        b.fill(0);
        let flags = match self.kind {
            NodeKind::Internal => INTERNAL_FLAG,
            NodeKind::Leaf => LEAF_FLAG,
        };
        put_u32(b, FLAGS, flags);
        put_u64(b, BLOCKNR, location);
        put_u32(b, NR_ENTRIES, self.keys.len() as u32);
        put_u32(b, MAX_ENTRIES, max as u32);
        put_u32(b, VALUE_SIZE, self.value_size as u32);
        for (i, k) in self.keys.iter().enumerate() {
            put_u64(b, NODE_HEADER_SIZE + 8 * i, *k);
        }
        let vstart = NODE_HEADER_SIZE + 8 * max;
        if let Some(s) = b.get_mut(vstart..vstart + self.values.len()) {
            s.copy_from_slice(&self.values);
        }
        seal(b, BTREE_CSUM_XOR);
    }

    /// Decodes and validates a node read from `location`, for a tree whose leaves hold
    /// values of `leaf_value_size` bytes.
    pub fn decode(b: &MetaBlock, location: u64, leaf_value_size: usize) -> Result<Node> {
        verify(b, location, BTREE_CSUM_XOR, "btree node")?;
        let bad = |reason: String| Error::corrupt(location, reason);
        let kind = match get_u32(b, FLAGS) {
            INTERNAL_FLAG => NodeKind::Internal,
            LEAF_FLAG => NodeKind::Leaf,
            f => return Err(bad(format!("btree node has flags {f:#x}, expected 1 or 2"))),
        };
        let value_size = get_u32(b, VALUE_SIZE) as usize;
        let expected = match kind {
            NodeKind::Internal => 8,
            NodeKind::Leaf => leaf_value_size,
        };
        if value_size != expected {
            return Err(bad(format!(
                "btree node value size {value_size}, expected {expected}"
            )));
        }
        let max = get_u32(b, MAX_ENTRIES) as usize;
        if max != max_entries(value_size) {
            return Err(bad(format!(
                "btree node max_entries {max}, expected {}",
                max_entries(value_size)
            )));
        }
        let nr = get_u32(b, NR_ENTRIES) as usize;
        if nr > max {
            return Err(bad(format!(
                "btree node has {nr} entries, more than its max {max}"
            )));
        }
        let keys: Vec<u64> = (0..nr)
            .map(|i| get_u64(b, NODE_HEADER_SIZE + 8 * i))
            .collect();
        if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
            return Err(bad(format!(
                "btree node keys out of order at entry {}: {} then {}",
                i + 1,
                keys[i],
                keys[i + 1]
            )));
        }
        let vstart = NODE_HEADER_SIZE + 8 * max;
        let values = b
            .get(vstart..vstart + nr * value_size)
            .ok_or_else(|| bad("btree node values run past the block".into()))?
            .to_vec();
        Ok(Node {
            kind,
            value_size,
            keys,
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(n: u64) -> Node {
        let mut node = Node::new(NodeKind::Leaf, 8);
        for k in 0..n {
            node.insert_at(k as usize, k * 3, &(k * 10).to_le_bytes());
        }
        node
    }

    #[test]
    fn round_trip_and_validation() {
        let node = leaf(100);
        let b = node.encode(42);
        assert_eq!(Node::decode(&b, 42, 8).expect("decodes"), node);
        assert!(Node::decode(&b, 43, 8).is_err(), "wrong location");
        assert!(Node::decode(&b, 42, 24).is_err(), "wrong value size");
    }

    #[test]
    fn lower_bound_finds_last_key_not_above() {
        let node = leaf(4); // keys 0 3 6 9
        assert_eq!(node.lower_bound(0), Some(0));
        assert_eq!(node.lower_bound(5), Some(1));
        assert_eq!(node.lower_bound(100), Some(3));
        let mut n2 = Node::new(NodeKind::Leaf, 8);
        n2.insert_at(0, 5, &[0; 8]);
        assert_eq!(n2.lower_bound(4), None);
    }
}
