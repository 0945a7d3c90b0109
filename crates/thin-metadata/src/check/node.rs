//! Decoding btree nodes for the checker, and the kinds of tree the metadata holds.
//!
//! Invariants: decoding never panics and never trusts a field before checking it: the
//! checksum first, then the block number, flags, value size and max_entries against what
//! dm-thin writes, then nr_entries against max_entries; only then are keys and values read,
//! all within the block. Key order is left to the caller, which reports it on its own.

use super::report::ProblemKind;
use crate::format::NODE_HEADER_SIZE;
use crate::format::{block_checksum, get_u32, get_u64, max_entries, MetaBlock, Node, NodeKind};
use crate::format::{BTREE_CSUM_XOR, DETAILS_SIZE, INDEX_ENTRY_SIZE, META_BLOCK_SIZE};

// The node header as format::node lays it out: csum, flags, blocknr, nr_entries,
// max_entries, value_size, padding. Derived field by field, checked against its total.
const FLAGS: usize = 4;
const BLOCKNR: usize = FLAGS + 4;
const NR_ENTRIES: usize = BLOCKNR + 8;
const MAX_ENTRIES: usize = NR_ENTRIES + 4;
const VALUE_SIZE: usize = MAX_ENTRIES + 4;
const _: () = assert!(VALUE_SIZE + 4 + 4 == NODE_HEADER_SIZE);
const INTERNAL_FLAG: u32 = 1;
const LEAF_FLAG: u32 = 2;

/// The kinds of btree in the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tree {
    Details,
    MappingTop,
    MappingBottom,
    DataIndex,
    DataRefCount,
    MetadataRefCount,
}

impl Tree {
    pub fn value_size(self) -> usize {
        match self {
            Tree::Details => DETAILS_SIZE,
            Tree::MappingTop | Tree::MappingBottom => 8,
            Tree::DataIndex => INDEX_ENTRY_SIZE,
            Tree::DataRefCount | Tree::MetadataRefCount => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tree::Details => "device details tree",
            Tree::MappingTop => "mapping tree (top level)",
            Tree::MappingBottom => "mapping tree of a thin",
            Tree::DataIndex => "data space map index tree",
            Tree::DataRefCount => "data space map ref-count tree",
            Tree::MetadataRefCount => "metadata space map ref-count tree",
        }
    }
}

/// Decodes and validates a node's header, for a tree whose leaves hold `leaf_value_size`
/// bytes. Key order is left to the caller, which reports it separately.
pub(super) fn parse_node(
    raw: &MetaBlock,
    b: u64,
    leaf_value_size: usize,
) -> Result<Node, (ProblemKind, String)> {
    let header = |why: String| (ProblemKind::NodeHeader, why);
    if let Some(why) = checksum_mismatch(raw, BTREE_CSUM_XOR) {
        return Err((ProblemKind::Checksum, why));
    }

    let blocknr = get_u64(raw, BLOCKNR);
    if blocknr != b {
        let why = format!("node says it lives at block {blocknr} (a misdirected write?)");
        return Err((ProblemKind::BlockNumber, why));
    }
    let kind = match get_u32(raw, FLAGS) {
        INTERNAL_FLAG => NodeKind::Internal,
        LEAF_FLAG => NodeKind::Leaf,
        f => {
            return Err(header(format!(
                "flags {f:#x}, expected 1 (internal) or 2 (leaf)"
            )))
        }
    };
    let value_size = get_u32(raw, VALUE_SIZE) as usize;
    let expected = match kind {
        NodeKind::Internal => 8,
        NodeKind::Leaf => leaf_value_size,
    };
    if value_size != expected {
        return Err(header(format!(
            "value size {value_size}, expected {expected} (a node of another tree?)"
        )));
    }
    let max = get_u32(raw, MAX_ENTRIES) as usize;
    let bytes = max
        .saturating_mul(8 + value_size)
        .saturating_add(NODE_HEADER_SIZE);
    if !max.is_multiple_of(3) || bytes > META_BLOCK_SIZE || max != max_entries(value_size) {
        return Err(header(format!(
            "max_entries {max}, expected {} (a multiple of 3 that fits the block)",
            max_entries(value_size)
        )));
    }
    let nr = get_u32(raw, NR_ENTRIES) as usize;
    if nr > max {
        return Err(header(format!("nr_entries {nr} exceeds max_entries {max}")));
    }
    let keys = (0..nr)
        .map(|i| get_u64(raw, NODE_HEADER_SIZE + 8 * i))
        .collect();
    let start = NODE_HEADER_SIZE + 8 * max;
    let values = raw
        .get(start..start + nr * value_size)
        .ok_or_else(|| header("values run past the end of the block".into()))?
        .to_vec();
    Ok(Node {
        kind,
        value_size,
        keys,
        values,
    })
}

/// The index of the first key not above its predecessor, if any.
pub(super) fn first_unordered_key(keys: &[u64]) -> Option<usize> {
    keys.iter()
        .zip(keys.iter().skip(1))
        .position(|(a, b)| a >= b)
        .map(|i| i + 1)
}

/// Why the checksum stored in `raw` is not the one `salt` gives, if it is not.
pub(super) fn checksum_mismatch(raw: &MetaBlock, salt: u32) -> Option<String> {
    let stored = get_u32(raw, 0);
    let computed = block_checksum(raw, salt);
    (stored != computed)
        .then(|| format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"))
}
