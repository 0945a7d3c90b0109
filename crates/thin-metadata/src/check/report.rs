//! What a check finds: problems with their location, and the report that collects them.
//!
//! Invariants: a problem names where it is as precisely as the checker knows (metadata block,
//! root-to-node path, key range, thin, data block); the sink never holds more than a bounded
//! number of problems of one kind, and counts the rest so that a report with omissions is
//! never mistaken for a clean one.

use std::fmt;

/// Problems of one kind listed individually; further ones are counted in a summary.
pub(super) const MAX_LISTED_PER_KIND: u64 = 10_000;
/// Reference-count mismatches listed individually per space (they come in thousands when a
/// tree is lost); the rest are summarised.
pub(super) const MAX_LISTED_REF_COUNTS: u64 = 100;

/// What kind of damage a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A block could not be read from the device.
    Io,
    /// The superblock (or the held snapshot's copy of it) is invalid.
    Superblock,
    /// A btree node's or the metadata index block's checksum does not match.
    Checksum,
    /// A block says it lives at another block number (a misdirected write).
    BlockNumber,
    /// A btree node header is invalid: flags, value size, max_entries or nr_entries.
    NodeHeader,
    /// Keys inside a node are not strictly increasing.
    KeyOrder,
    /// A node's first key is below the key its parent holds for it.
    ParentKey,
    /// A node holds a key at or above the parent's next key (it overlaps its right sibling).
    KeyRange,
    /// A node other than a tree root is less than a third full (or internal and empty).
    TooFewEntries,
    /// A descent went deeper than any valid tree can be.
    TreeTooDeep,
    /// A node is its own descendant.
    Cycle,
    /// The leaves below an internal node are not all at the same depth.
    UnevenTree,
    /// A node is reachable from trees of different kinds.
    CrossLinked,
    /// A block number, data block or thin id is outside its space.
    OutOfRange,
    /// The device details tree and the mapping tree list different thins.
    DetailsMismatch,
    /// A thin's `mapped_blocks` differs from the number of its mappings.
    MappedBlocksMismatch,
    /// A metadata block's count in the space map differs from the references to it.
    MetadataRefCount,
    /// A data block's count in the space map differs from the references to it.
    DataRefCount,
    /// The reference-count tree disagrees with the bitmaps (a 3 without an entry, an entry
    /// without a 3, or an entry below 3).
    RefCountTree,
    /// A space map index is wrong: missing or extra bitmaps, nr_free, none_free_before,
    /// nr_allocated.
    SpaceMapIndex,
    /// A space map bitmap block's checksum does not match.
    BitmapChecksum,
}

/// One problem found by the checker, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The metadata block the problem is in (for data reference counts: the bitmap block).
    pub block: Option<u64>,
    /// Blocks from the tree's root down to `block` (for a thin's mappings, from the root of
    /// the top-level mapping tree); empty when the block is not in a btree.
    pub path: Vec<u64>,
    /// The half-open range of keys the damaged node covers (`u64::MAX` as end: unbounded).
    pub key_range: Option<(u64, u64)>,
    /// The thin the problem concerns, if any.
    pub thin: Option<u32>,
    /// The data block the problem concerns, if any.
    pub data_block: Option<u64>,
    pub kind: ProblemKind,
    /// What is wrong, in words.
    pub detail: String,
}

impl Problem {
    /// A problem with no location but its kind.
    pub(super) fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem {
            block: None,
            path: Vec::new(),
            key_range: None,
            thin: None,
            data_block: None,
            kind,
            detail: detail.into(),
        }
    }

    pub(super) fn at(mut self, block: u64) -> Self {
        self.block = Some(block);
        self
    }

    pub(super) fn thin(mut self, thin: Option<u32>) -> Self {
        self.thin = thin;
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut context = Vec::new();
        if !self.path.is_empty() {
            let p: Vec<String> = self.path.iter().map(u64::to_string).collect();
            context.push(format!("path {}", p.join(" -> ")));
        }
        if let Some((lo, hi)) = self.key_range {
            context.push(if hi == u64::MAX {
                format!("keys {lo}..")
            } else {
                format!("keys {lo}..{hi}")
            });
        }
        if let Some(t) = self.thin {
            context.push(format!("thin {t}"));
        }
        if let Some(d) = self.data_block {
            context.push(format!("data block {d}"));
        }
        let context = context.join(", ");
        match (self.block, context.is_empty()) {
            (Some(b), true) => write!(f, "block {b}: {}", self.detail),
            (Some(b), false) => write!(f, "block {b} ({context}): {}", self.detail),
            (None, true) => f.write_str(&self.detail),
            (None, false) => write!(f, "{context}: {}", self.detail),
        }
    }
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Every problem found, in the order found (capped per kind, see `nr_problems_omitted`).
    pub problems: Vec<Problem>,
    /// Problems counted but not listed because their kind hit its cap; each capped kind
    /// also has one summary problem in `problems`.
    pub nr_problems_omitted: u64,
    /// Harmless disagreements that do not make the metadata unclean: space-map search hints
    /// (index free counts, none_free_before, the root's allocated total) that differ from
    /// the bitmaps. The kernel tolerates them and thin_check ignores them; thin_restore
    /// writes some. At most 100 are kept.
    pub notes: Vec<Problem>,
    /// Thins in the device details tree.
    pub nr_thins: u64,
    /// Mappings of all thins (a block shared by two thins counts twice).
    pub nr_mappings: u64,
    /// Metadata blocks found referenced (recomputed, not read from the space map).
    pub nr_metadata_blocks_used: u64,
    /// Data blocks found referenced (recomputed, not read from the space map).
    pub nr_data_blocks_used: u64,
    /// Size of the metadata space map.
    pub nr_metadata_blocks: u64,
    /// Size of the data space map.
    pub nr_data_blocks: u64,
    pub data_block_size_sectors: u32,
    pub transaction_id: u64,
    pub time: u32,
    /// Location of the held metadata snapshot, if any.
    pub held_root: Option<u64>,
    /// The superblock's needs_check flag.
    pub needs_check: bool,
    /// Mappings were not walked (`CheckOptions::skip_mappings`), so reference counts,
    /// data blocks and `mapped_blocks` were not checked.
    pub skipped_mappings: bool,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.nr_problems_omitted == 0
    }

    /// The problems of one kind.
    pub fn of_kind(&self, kind: ProblemKind) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.kind == kind)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        let verdict = if self.is_clean() {
            "clean".to_string()
        } else {
            let n = self.problems.len() as u64 + self.nr_problems_omitted;
            format!("{n} problem(s)")
        };
        write!(
            f,
            "{verdict}: {} thins, {} mappings, {}/{} metadata blocks used, {}/{} data blocks used",
            self.nr_thins,
            self.nr_mappings,
            self.nr_metadata_blocks_used,
            self.nr_metadata_blocks,
            self.nr_data_blocks_used,
            self.nr_data_blocks
        )?;
        if self.skipped_mappings {
            f.write_str(" (mappings not checked)")?;
        }
        Ok(())
    }
}

/// Collects problems, listing at most a fixed number of each kind.
#[derive(Debug, Default)]
pub(super) struct Problems {
    pub list: Vec<Problem>,
    /// Problems of each kind seen so far, listed or not.
    seen: std::collections::HashMap<ProblemKind, u64>,
    pub nr_omitted: u64,
}

impl Problems {
    pub fn push(&mut self, p: Problem) {
        let cap = match p.kind {
            ProblemKind::MetadataRefCount | ProblemKind::DataRefCount => MAX_LISTED_REF_COUNTS,
            _ => MAX_LISTED_PER_KIND,
        };
        let seen = self.seen.entry(p.kind).or_insert(0);
        *seen += 1;
        if *seen <= cap {
            self.list.push(p);
        } else {
            self.nr_omitted += 1;
        }
    }

    /// Appends one summary problem for each kind that went over its cap.
    pub fn finish(&mut self) {
        let mut over: Vec<(ProblemKind, u64)> = self
            .seen
            .iter()
            .filter_map(|(&kind, &n)| {
                let listed = self.list.iter().filter(|p| p.kind == kind).count() as u64;
                (n > listed).then_some((kind, n - listed))
            })
            .collect();
        over.sort_by_key(|&(kind, _)| format!("{kind:?}"));
        for (kind, n) in over {
            self.list.push(Problem::new(
                kind,
                format!("... and {n} more problems of this kind ({kind:?}) not listed"),
            ));
        }
    }
}
