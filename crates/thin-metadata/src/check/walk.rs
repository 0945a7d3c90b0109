//! The btree walker: validates every node reachable from a root and counts every reference.
//!
//! Invariants:
//! - each call of `visit` is one reference to a node and counts it once in the metadata
//!   counts, whether or not the node was seen before;
//! - a node is read and checked once (its first visit); later references to it (snapshots
//!   share subtrees) are checked against what was remembered of it: its tree, how full it
//!   is, and its key range, so a shared node is judged in every position it appears in;
//! - a node whose contents cannot be trusted (unreadable, bad checksum, misdirected, bad
//!   header, keys out of order) is reported and not descended into: nothing below it is
//!   counted, and its subtree is marked incomplete so later comparisons that need the whole
//!   tree are skipped rather than reported twice;
//! - descent is bounded by `MAX_DEPTH` levels a tree, and a node reached while its own
//!   subtree is being walked is a cycle, so no input makes the walk loop or overflow the stack.

use super::counts::RefCounter;
use super::node::{first_unordered_key, parse_node, Tree};
use super::report::{Problem, ProblemKind, Problems};
use crate::format::{zeroed_block, MetaBlock, Node, NodeKind, SUPERBLOCK_LOCATION};
use block_io::MetaDevice;
use std::collections::HashMap;
use std::sync::Arc;

/// Levels of one tree the walker descends at most. A non-root node holds at least 84
/// entries, so 16 levels address far more entries than any metadata device holds.
pub(super) const MAX_DEPTH: usize = 16;

/// The upper key bound of a tree root: nothing is above it (so a key of `u64::MAX` is
/// legal at the right edge of every tree).
const UNBOUNDED: u64 = u64::MAX;

/// Most reads between two progress reports.
const MAX_READS_PER_PROGRESS: u64 = 256;

/// Progress reports over a check: about one a percent (checks of more than 25600 blocks
/// report every `MAX_READS_PER_PROGRESS` reads instead, so more often).
const PROGRESS_REPORTS: u64 = 100;

/// What a subtree contributes to its parent.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Summary {
    /// The whole subtree was read without damage.
    pub complete: bool,
    /// Leaf entries below, per reference (a shared subtree counts in each tree holding it).
    pub nr_leaf_entries: u64,
    /// Levels below the node (0 for a leaf), when known.
    pub height: Option<u32>,
    /// The node's first key.
    pub first_key: Option<u64>,
    /// The subtree's largest key.
    pub max_key: Option<u64>,
}

/// What the walker remembers of a node after its first visit.
#[derive(Debug, Clone, Copy)]
struct NodeInfo {
    tree: Tree,
    in_progress: bool,
    /// The node itself could not be used.
    damaged: bool,
    summary: Summary,
    nr_entries: u32,
    min_entries: u32,
    underfull_reported: bool,
}

impl NodeInfo {
    fn unusable(tree: Tree, in_progress: bool) -> Self {
        NodeInfo {
            tree,
            in_progress,
            damaged: true,
            summary: Summary::default(),
            nr_entries: 0,
            min_entries: 0,
            underfull_reported: true,
        }
    }
}

/// A leaf handed to a tree's leaf handler on its first visit.
pub(super) struct Leaf<'a> {
    pub block: u64,
    pub node: &'a Node,
}

/// What a tree does with the entries of each of its leaves.
pub(super) type LeafFn<'f> = dyn FnMut(&mut Walker<'_>, &Leaf<'_>) + 'f;

/// The reporting callback of `CheckOptions`.
pub(super) type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Notes kept at most.
const MAX_NOTES: usize = 100;

/// State of one check: counts, remembered nodes, problems, and where the walk is.
pub(super) struct Walker<'d> {
    dev: &'d dyn MetaDevice,
    /// Node pointers must lie in `1..nr_meta`.
    pub nr_meta: u64,
    /// Recomputed metadata reference counts.
    pub meta: RefCounter,
    /// Recomputed data reference counts.
    pub data: RefCounter,
    nodes: HashMap<u64, NodeInfo>,
    pub problems: Problems,
    /// Harmless disagreements (see `CheckReport::notes`).
    pub notes: Vec<Problem>,
    /// Blocks from the current tree's root to the node being checked.
    pub path: Vec<u64>,
    /// The thin whose mappings are being walked.
    pub thin: Option<u32>,
    /// Prefix of every problem's detail (names the held snapshot while it is walked).
    pub scope: &'static str,
    /// Some reference could not be followed (damage was reported), so blocks only it led to
    /// look unreferenced: leaks are then summarised rather than listed.
    pub incomplete: bool,
    nr_reads: u64,
    progress: Option<Progress>,
    progress_total: u64,
    /// Reads between two progress reports.
    progress_every: u64,
}

impl<'d> Walker<'d> {
    pub fn new(
        dev: &'d dyn MetaDevice,
        nr_meta: u64,
        nr_data: u64,
        progress: Option<Progress>,
    ) -> Self {
        Walker {
            dev,
            nr_meta,
            meta: RefCounter::new(nr_meta),
            data: RefCounter::new(nr_data),
            nodes: HashMap::new(),
            problems: Problems::default(),
            notes: Vec::new(),
            path: Vec::new(),
            thin: None,
            scope: "",
            incomplete: false,
            nr_reads: 0,
            progress,
            progress_total: 1,
            progress_every: 1,
        }
    }

    /// A problem at the current path and thin.
    pub fn problem(
        &self,
        block: Option<u64>,
        kind: ProblemKind,
        key_range: Option<(u64, u64)>,
        detail: String,
    ) -> Problem {
        let mut p = Problem::new(kind, format!("{}{detail}", self.scope)).thin(self.thin);
        p.block = block;
        p.path = self.path.clone();
        p.key_range = key_range;
        p
    }

    /// Records a problem at the current path and thin.
    pub fn report(
        &mut self,
        block: Option<u64>,
        kind: ProblemKind,
        key_range: Option<(u64, u64)>,
        detail: String,
    ) {
        let p = self.problem(block, kind, key_range, detail);
        self.problems.push(p);
    }

    /// Records a harmless disagreement: a hint the kernel recomputes or tolerates, which
    /// thin_check does not judge either. It does not make the report unclean.
    pub fn note(&mut self, block: Option<u64>, kind: ProblemKind, detail: String) {
        if self.notes.len() < MAX_NOTES {
            let p = self.problem(block, kind, None, detail);
            self.notes.push(p);
        }
    }

    /// Reads a metadata block, reporting progress now and then.
    pub fn read(&mut self, b: u64) -> Result<Box<MetaBlock>, String> {
        let mut buf = zeroed_block();
        self.dev
            .read_block(b, &mut buf)
            .map_err(|e| format!("cannot read block {b}: {e}"))?;
        self.nr_reads += 1;
        if self.nr_reads.is_multiple_of(self.progress_every) {
            self.report_progress(false);
        }
        Ok(buf)
    }

    /// Sets the total of progress reports (blocks to read), before the first read.
    pub fn set_progress_total(&mut self, total: u64) {
        self.progress_total = total.max(1);
        self.progress_every =
            (self.progress_total / PROGRESS_REPORTS).clamp(1, MAX_READS_PER_PROGRESS);
    }

    /// Calls the progress callback; `done` forces 100%.
    pub fn report_progress(&self, done: bool) {
        if let Some(f) = &self.progress {
            let total = self.progress_total.max(1);
            f(
                if done {
                    total
                } else {
                    self.nr_reads.min(total)
                },
                total,
            );
        }
    }

    /// True when `b` can be a node, bitmap or index block (not the superblock, not past
    /// the metadata area).
    pub fn in_meta_area(&self, b: u64) -> bool {
        b != SUPERBLOCK_LOCATION && b < self.nr_meta
    }

    /// Walks the tree rooted at `root`, one reference to it.
    pub fn visit_root(&mut self, root: u64, tree: Tree, leaf: &mut LeafFn<'_>) -> Summary {
        self.visit(root, tree, (0, UNBOUNDED), true, 0, leaf)
    }

    /// True when `b` was visited as a node of a tree other than `tree`, or found damaged.
    pub fn known_unusable(&self, b: u64, tree: Tree) -> bool {
        self.nodes
            .get(&b)
            .is_some_and(|i| i.damaged || i.tree != tree)
    }

    /// The summary of an already visited tree root of kind `tree`.
    pub fn summary_of(&self, b: u64, tree: Tree) -> Option<Summary> {
        self.nodes
            .get(&b)
            .filter(|i| i.tree == tree && !i.in_progress)
            .map(|i| i.summary)
    }

    /// Follows one reference to node `b` of `tree`, whose keys the parent bounds to
    /// `bounds` (end exclusive). Tree roots (`is_root`) may be less than a third full.
    pub fn visit(
        &mut self,
        b: u64,
        tree: Tree,
        bounds: (u64, u64),
        is_root: bool,
        depth: usize,
        leaf: &mut LeafFn<'_>,
    ) -> Summary {
        let range = (!is_root).then_some(bounds);
        if !self.in_meta_area(b) {
            let parent = self.path.last().copied();
            let detail = format!(
                "{}: pointer to block {b}, outside the metadata area 1..{}",
                tree.name(),
                self.nr_meta
            );
            self.report(parent, ProblemKind::OutOfRange, range, detail);
            self.incomplete = true;
            return Summary::default();
        }
        self.meta.inc(b);
        self.path.push(b);
        let summary = match self.nodes.get(&b).copied() {
            Some(info) => self.revisit(b, info, tree, bounds, is_root),
            None if depth >= MAX_DEPTH => {
                let detail = format!("{}: deeper than {MAX_DEPTH} levels", tree.name());
                self.report(Some(b), ProblemKind::TreeTooDeep, range, detail);
                Summary::default()
            }
            None => {
                self.nodes.insert(b, NodeInfo::unusable(tree, true));
                let info = self.first_visit(b, tree, bounds, is_root, depth, leaf);
                self.nodes.insert(b, info);
                info.summary
            }
        };
        self.path.pop();
        self.incomplete |= !summary.complete;
        summary
    }

    fn first_visit(
        &mut self,
        b: u64,
        tree: Tree,
        (lo, hi): (u64, u64),
        is_root: bool,
        depth: usize,
        leaf: &mut LeafFn<'_>,
    ) -> NodeInfo {
        let range = (!is_root).then_some((lo, hi));
        let parsed = match self.read(b) {
            Err(why) => Err((ProblemKind::Io, why)),
            Ok(raw) => parse_node(&raw, b, tree.value_size()),
        };
        let node = match parsed {
            Ok(node) => node,
            Err((kind, why)) => {
                self.report(Some(b), kind, range, format!("{}: {why}", tree.name()));
                return NodeInfo::unusable(tree, false);
            }
        };
        let keys = &node.keys;
        if let Some(i) = first_unordered_key(keys) {
            let before = keys.get(i - 1).copied().unwrap_or(0);
            let at = keys.get(i).copied().unwrap_or(0);
            let detail = format!(
                "{}: keys out of order at entry {i}: {before} then {at}",
                tree.name()
            );
            self.report(Some(b), ProblemKind::KeyOrder, range, detail);
            return NodeInfo::unusable(tree, false);
        }
        if node.kind == NodeKind::Internal && keys.is_empty() {
            let detail = format!("{}: internal node has no entries", tree.name());
            self.report(Some(b), ProblemKind::TooFewEntries, range, detail);
            return NodeInfo::unusable(tree, false);
        }
        let nr = keys.len();
        let min = node.max_entries() / 3;
        let underfull = !is_root && nr < min;
        if underfull {
            let detail = format!(
                "{}: too few entries in btree node: {nr} < {min}",
                tree.name()
            );
            self.report(Some(b), ProblemKind::TooFewEntries, range, detail);
        }
        let (first, last) = (keys.first().copied(), keys.last().copied());
        self.check_bounds(b, tree, first, last, (lo, hi), range);
        let mut summary = Summary {
            complete: true,
            nr_leaf_entries: 0,
            height: None,
            first_key: first,
            max_key: last,
        };
        match node.kind {
            NodeKind::Leaf => {
                leaf(
                    self,
                    &Leaf {
                        block: b,
                        node: &node,
                    },
                );
                summary.nr_leaf_entries = nr as u64;
                summary.height = Some(0);
            }
            NodeKind::Internal => {
                let mut child_height = None;
                let mut uneven = false;
                for (i, &key) in keys.iter().enumerate() {
                    let next = keys.get(i + 1).copied().unwrap_or(hi);
                    let s =
                        self.visit(node.value_u64(i), tree, (key, next), false, depth + 1, leaf);
                    summary.complete &= s.complete;
                    summary.nr_leaf_entries =
                        summary.nr_leaf_entries.saturating_add(s.nr_leaf_entries);
                    summary.max_key = summary.max_key.max(s.max_key);
                    match (child_height, s.height) {
                        (None, h) => child_height = h,
                        (Some(c), Some(h)) if c != h => uneven = true,
                        _ => {}
                    }
                }
                if uneven {
                    let detail = format!(
                        "{}: leaves below this node are at different depths",
                        tree.name()
                    );
                    self.report(Some(b), ProblemKind::UnevenTree, range, detail);
                }
                summary.height = child_height.map(|h| h.saturating_add(1));
            }
        }
        NodeInfo {
            tree,
            in_progress: false,
            damaged: false,
            summary,
            nr_entries: nr as u32,
            min_entries: min as u32,
            underfull_reported: underfull,
        }
    }

    /// Checks a node seen before in its new position.
    fn revisit(
        &mut self,
        b: u64,
        info: NodeInfo,
        tree: Tree,
        bounds: (u64, u64),
        is_root: bool,
    ) -> Summary {
        let range = (!is_root).then_some(bounds);
        if info.in_progress {
            let detail = format!("{}: node is its own ancestor (a cycle)", tree.name());
            self.report(Some(b), ProblemKind::Cycle, range, detail);
            return Summary::default();
        }
        if info.tree != tree {
            let detail = format!(
                "node of the {} is also referenced from the {}",
                info.tree.name(),
                tree.name()
            );
            self.report(Some(b), ProblemKind::CrossLinked, range, detail);
            return Summary::default();
        }
        if info.damaged {
            return info.summary;
        }
        if !is_root && info.nr_entries < info.min_entries && !info.underfull_reported {
            let detail = format!(
                "{}: too few entries in btree node: {} < {} (shared node, a root elsewhere)",
                tree.name(),
                info.nr_entries,
                info.min_entries
            );
            self.report(Some(b), ProblemKind::TooFewEntries, range, detail);
            if let Some(i) = self.nodes.get_mut(&b) {
                i.underfull_reported = true;
            }
        }
        let s = info.summary;
        self.check_bounds(b, tree, s.first_key, s.max_key, bounds, range);
        s
    }

    fn check_bounds(
        &mut self,
        b: u64,
        tree: Tree,
        first: Option<u64>,
        last: Option<u64>,
        (lo, hi): (u64, u64),
        range: Option<(u64, u64)>,
    ) {
        if let Some(first) = first.filter(|&k| k < lo) {
            let detail = format!(
                "{}: first key {first} is below the parent's key {lo}",
                tree.name()
            );
            self.report(Some(b), ProblemKind::ParentKey, range, detail);
        }
        if let Some(last) = last.filter(|&k| hi != UNBOUNDED && k >= hi) {
            let detail = format!(
                "{}: key {last} is not below the parent's next key {hi} (overlaps the next node)",
                tree.name()
            );
            self.report(Some(b), ProblemKind::KeyRange, range, detail);
        }
    }
}
