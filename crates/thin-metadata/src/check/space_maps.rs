//! The two space maps as stored on disk, against the recomputed reference counts.
//!
//! Invariants: every structure of a space map is counted before any count of its space is
//! compared (the metadata space map describes its own bitmaps, index block and ref-count
//! tree); bitmaps are read one at a time, so memory does not grow with the data device; a
//! bitmap that cannot be read is reported once and the counts it holds are not compared.

use super::node::{checksum_mismatch, Tree};
use super::report::ProblemKind;
use super::walk::Walker;
use crate::error::Space;
use crate::format::{bitmap_get, decode_bitmap, decode_metadata_index};
use crate::format::{get_u32, get_u64, IndexEntry, SmRoot, BITMAP_CSUM_XOR, ENTRIES_PER_BITMAP};
use crate::format::{INDEX_CSUM_XOR, MAX_METADATA_BITMAPS};
use std::collections::BTreeMap;

/// A space map's structures as found: index entries by bitmap number (with the metadata
/// block that holds each), and the ref-count tree's counts (with the leaf holding each).
#[derive(Debug, Default)]
pub(super) struct SmTrees {
    index: BTreeMap<u64, (IndexEntry, u64)>,
    ref_counts: BTreeMap<u64, (u32, u64)>,
}

/// Walks the data space map's index tree and ref-count tree.
pub(super) fn walk_data(w: &mut Walker<'_>, root: &SmRoot) -> SmTrees {
    let mut t = SmTrees::default();
    w.visit_root(root.bitmap_root, Tree::DataIndex, &mut |_, leaf| {
        for (i, &k) in leaf.node.keys.iter().enumerate() {
            t.index
                .insert(k, (IndexEntry::decode(leaf.node.value(i)), leaf.block));
        }
    });
    walk_ref_counts(w, root.ref_count_root, Tree::DataRefCount, &mut t);
    t
}

/// Reads the metadata space map's index block and walks its ref-count tree.
pub(super) fn walk_metadata(w: &mut Walker<'_>, root: &SmRoot) -> SmTrees {
    let mut t = SmTrees::default();
    let loc = root.bitmap_root;
    let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let nr_bitmaps =
        usize::try_from(nr_bitmaps).map_or(MAX_METADATA_BITMAPS, |n| n.min(MAX_METADATA_BITMAPS));
    if !w.in_meta_area(loc) {
        let detail = format!("metadata space map index at block {loc}, outside the metadata area");
        w.report(Some(0), ProblemKind::OutOfRange, None, detail);
    } else {
        w.meta.inc(loc);
        match w.read(loc) {
            Err(why) => w.report(Some(loc), ProblemKind::Io, None, why),
            Ok(raw) => {
                let blocknr = get_u64(&raw[..], 8);
                let what = "metadata space map index block";
                if let Some(why) = checksum_mismatch(&raw, INDEX_CSUM_XOR) {
                    w.report(
                        Some(loc),
                        ProblemKind::Checksum,
                        None,
                        format!("{what}: {why}"),
                    );
                } else if blocknr != loc {
                    let detail = format!("{what} says it lives at block {blocknr}");
                    w.report(Some(loc), ProblemKind::BlockNumber, None, detail);
                } else if let Ok(entries) = decode_metadata_index(&raw, loc, nr_bitmaps) {
                    for (i, e) in entries.into_iter().enumerate() {
                        t.index.insert(i as u64, (e, loc));
                    }
                }
            }
        }
    }
    walk_ref_counts(w, root.ref_count_root, Tree::MetadataRefCount, &mut t);
    t
}

fn walk_ref_counts(w: &mut Walker<'_>, root: u64, tree: Tree, t: &mut SmTrees) {
    w.visit_root(root, tree, &mut |_, leaf| {
        for (i, &k) in leaf.node.keys.iter().enumerate() {
            t.ref_counts
                .insert(k, (get_u32(leaf.node.value(i), 0), leaf.block));
        }
    });
}

/// Compares a space map of `nr_blocks` blocks with the recomputed counts (when `compare`),
/// and checks it for consistency with itself: index entries, bitmaps, ref-count tree,
/// nr_allocated.
pub(super) fn check(
    w: &mut Walker<'_>,
    space: Space,
    root: &SmRoot,
    nr_blocks: u64,
    t: &SmTrees,
    compare: bool,
) {
    let nr_bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    // Count every bitmap block first: the metadata space map counts its own bitmaps.
    for (&i, &(e, holder)) in &t.index {
        if i >= nr_bitmaps {
            let detail = format!(
                "{space} space map index has an entry for bitmap {i}, past the last \
                 ({nr_bitmaps} bitmaps)"
            );
            w.report(Some(holder), ProblemKind::SpaceMapIndex, None, detail);
        } else if !w.in_meta_area(e.blocknr) {
            let detail = format!(
                "{space} space map bitmap {i} is at block {}, outside the metadata area",
                e.blocknr
            );
            w.report(Some(holder), ProblemKind::OutOfRange, None, detail);
        } else {
            w.meta.inc(e.blocknr);
        }
    }
    let mut all_read = true;
    let mut nr_allocated = 0u64;
    let mut next = 0u64;
    let mut leaks = Leaks::default();
    for (&i, &(e, holder)) in t.index.range(..nr_bitmaps) {
        if i > next {
            report_missing(w, space, next, i);
            all_read = false;
        }
        next = i + 1;
        match check_bitmap(w, space, (i, e, holder), nr_blocks, t, compare, &mut leaks) {
            Some(n) => nr_allocated += n,
            None => all_read = false,
        }
    }
    if next < nr_bitmaps {
        report_missing(w, space, next, nr_bitmaps);
        all_read = false;
    }
    for (&b, &(c, leaf)) in &t.ref_counts {
        if b >= nr_blocks {
            let detail = format!(
                "{space} ref-count tree holds block {b} (count {c}), past the end \
                 ({nr_blocks} blocks)"
            );
            w.report(Some(leaf), ProblemKind::OutOfRange, None, detail);
        } else if c < 3 {
            let detail = format!(
                "{space} ref-count tree holds block {b} with count {c}; counts below 3 \
                 belong in the bitmap"
            );
            w.report(Some(leaf), ProblemKind::RefCountTree, None, detail);
        }
    }
    leaks.report(w, space);
    if all_read && nr_allocated != root.nr_allocated {
        let detail = format!(
            "{space} space map root says {} blocks are allocated, the bitmaps hold {nr_allocated}",
            root.nr_allocated
        );
        // The kernel recounts nothing from this total, and thin_restore writes its own.
        w.note(Some(0), ProblemKind::SpaceMapIndex, detail);
    }
}

/// Reports that bitmaps `from..to` have no index entry.
fn report_missing(w: &mut Walker<'_>, space: Space, from: u64, to: u64) {
    let which = if to == from + 1 {
        format!("bitmap {from}")
    } else {
        format!("bitmaps {from}..{to}")
    };
    let detail = format!("{space} space map index has no entry for {which}");
    w.report(None, ProblemKind::SpaceMapIndex, None, detail);
}

/// Blocks the space map counts more often than the walk found, while damage kept the walk
/// from following every reference: most are what the damaged structures referenced, so
/// they are summarised in one problem instead of drowning the damage itself.
#[derive(Debug, Default)]
struct Leaks {
    nr_blocks: u64,
    first: Vec<u64>,
}

/// Leaked blocks a summary names.
const LEAKS_NAMED: usize = 10;

impl Leaks {
    fn add(&mut self, b: u64) {
        self.nr_blocks += 1;
        if self.first.len() < LEAKS_NAMED {
            self.first.push(b);
        }
    }

    fn report(&self, w: &mut Walker<'_>, space: Space) {
        let Some(&first) = self.first.first() else {
            return;
        };
        let named: Vec<String> = self.first.iter().map(u64::to_string).collect();
        let more = if self.nr_blocks > self.first.len() as u64 {
            ", ..."
        } else {
            ""
        };
        let detail = format!(
            "{} {space} block(s) have higher counts in the space map than references found \
             (blocks {}{more}); expected, since damage reported above kept the check from \
             following every reference",
            self.nr_blocks,
            named.join(", ")
        );
        let mut p = match space {
            Space::Metadata => w.problem(Some(first), ProblemKind::MetadataRefCount, None, detail),
            Space::Data => w.problem(None, ProblemKind::DataRefCount, None, detail),
        };
        if space == Space::Data {
            p.data_block = Some(first);
        }
        w.problems.push(p);
    }
}

/// Checks one bitmap (number, index entry, block holding the entry) and its index entry;
/// returns its number of allocated blocks, or None when it could not be read.
fn check_bitmap(
    w: &mut Walker<'_>,
    space: Space,
    (i, e, holder): (u64, IndexEntry, u64),
    nr_blocks: u64,
    t: &SmTrees,
    compare: bool,
    leaks: &mut Leaks,
) -> Option<u64> {
    let loc = e.blocknr;
    if !w.in_meta_area(loc) {
        return None;
    }
    let raw = match w.read(loc) {
        Ok(raw) => raw,
        Err(why) => {
            w.report(Some(loc), ProblemKind::Io, None, why);
            return None;
        }
    };
    if let Some(why) = checksum_mismatch(&raw, BITMAP_CSUM_XOR) {
        let detail = format!("{space} space map bitmap {i}: {why}");
        w.report(Some(loc), ProblemKind::BitmapChecksum, None, detail);
        return None;
    }
    let Ok(bits) = decode_bitmap(&raw, loc) else {
        let detail = format!(
            "{space} space map bitmap {i} says it lives at block {}",
            get_u64(&raw[..], 8)
        );
        w.report(Some(loc), ProblemKind::BlockNumber, None, detail);
        return None;
    };
    let first = i.saturating_mul(ENTRIES_PER_BITMAP);
    let (mut nr_free, mut nr_allocated, mut nr_past_end) = (0u64, 0u64, 0u64);
    let mut nr_free_past_end = 0u64;
    let mut first_free = None;
    // Four 2-bit counts to a byte.
    for (byte_index, &byte) in bits.iter().enumerate() {
        let entry0 = byte_index as u64 * 4;
        let b0 = first + entry0;
        // Fast path: four free entries nothing references.
        if byte == 0 && b0 + 4 <= nr_blocks && (!compare || w.counts(space).all_zero(b0, 4)) {
            nr_free += 4;
            first_free.get_or_insert(entry0);
            continue;
        }
        for entry in entry0..entry0 + 4 {
            let b = first + entry;
            let v = bitmap_get(&bits[..], entry);
            if v == 0 {
                nr_free += 1;
                first_free.get_or_insert(entry);
            }
            if b >= nr_blocks {
                nr_past_end += u64::from(v != 0);
                nr_free_past_end += u64::from(v == 0);
                continue;
            }
            nr_allocated += u64::from(v != 0);
            let found = match (v, if v == 3 { t.ref_counts.get(&b) } else { None }) {
                (3, Some(&(c, _))) => c,
                (3, None) => {
                    let detail = format!(
                        "{space} block {b} has count 3+ in its bitmap but no entry in the \
                         ref-count tree"
                    );
                    let range = Some((b, b + 1));
                    w.report(Some(loc), ProblemKind::RefCountTree, range, detail);
                    continue;
                }
                (v, _) => v,
            };
            if compare {
                let expected = w.counts(space).get(b);
                if found > expected && w.incomplete {
                    leaks.add(b);
                } else if found != expected {
                    report_count(w, space, b, loc, found, expected);
                }
            }
        }
    }
    // Ref-count entries of this bitmap's blocks whose 2-bit count is not 3.
    let end = first.saturating_add(ENTRIES_PER_BITMAP).min(nr_blocks);
    for (&b, &(c, leaf)) in t.ref_counts.range(first..end) {
        let v = bitmap_get(&bits[..], b - first);
        if v != 3 {
            let detail = format!(
                "{space} ref-count tree holds block {b} (count {c}) but its bitmap says {v}"
            );
            w.report(
                Some(leaf),
                ProblemKind::RefCountTree,
                Some((b, b + 1)),
                detail,
            );
        }
    }
    if nr_past_end > 0 {
        let detail = format!(
            "{space} space map bitmap {i}: {nr_past_end} entries past the end of the space \
             are in use"
        );
        w.report(Some(loc), ProblemKind::OutOfRange, None, detail);
    }
    // nr_free and none_free_before are search hints: the kernel starts every new bitmap
    // with nr_free = 16320 (counting entries past the end as free), thin_restore counts only
    // entries inside the space and may leave stale hints, and neither the kernel nor
    // thin_check treats a difference as damage. So a difference is a note, not a problem.
    if u64::from(e.nr_free) != nr_free && u64::from(e.nr_free) != nr_free - nr_free_past_end {
        let detail = format!(
            "{space} space map index entry of bitmap {i} says {} free, the bitmap has {nr_free}",
            e.nr_free
        );
        w.note(Some(holder), ProblemKind::SpaceMapIndex, detail);
    }
    // A search hint: no entry before it may be free (it need not be the first free one).
    let none_free_before = u64::from(e.none_free_before);
    if none_free_before > first_free.unwrap_or(ENTRIES_PER_BITMAP) {
        let detail = match first_free {
            Some(f) => format!(
                "{space} space map index entry of bitmap {i} says none is free before entry \
                 {none_free_before}, but entry {f} is free"
            ),
            None => format!(
                "{space} space map index entry of bitmap {i} says none is free before entry \
                 {none_free_before}, past the bitmap's {ENTRIES_PER_BITMAP} entries"
            ),
        };
        w.note(Some(holder), ProblemKind::SpaceMapIndex, detail);
    }
    Some(nr_allocated)
}

fn report_count(w: &mut Walker<'_>, space: Space, b: u64, bitmap: u64, found: u32, expected: u32) {
    let what = match (found, expected) {
        (_, 0) => " (leaked: allocated but unreferenced)",
        (0, _) => " (in use but free in the space map!)",
        _ => "",
    };
    let detail = format!(
        "{space} block {b}: space map count {found}, but {expected} reference(s) found{what}"
    );
    match space {
        Space::Metadata => w.report(Some(b), ProblemKind::MetadataRefCount, None, detail),
        Space::Data => {
            let mut p = w.problem(Some(bitmap), ProblemKind::DataRefCount, None, detail);
            p.data_block = Some(b);
            w.problems.push(p);
        }
    }
}

impl Walker<'_> {
    fn counts(&self, space: Space) -> &super::counts::RefCounter {
        match space {
            Space::Metadata => &self.meta,
            Space::Data => &self.data,
        }
    }
}
