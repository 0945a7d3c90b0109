//! Offline check of a metadata device: an independent re-implementation of what
//! thin-provisioning-tools' `thin_check` verifies.
//!
//! It reads raw blocks and decodes them with `crate::format` only; it shares no code with
//! the store, space maps or btrees it checks, so a bug there cannot hide itself here.
//!
//! What is checked:
//! - the superblock: magic, checksum, block number, version, feature flags, block sizes, and
//!   its sizes against the device;
//! - every btree reachable from it (device details, both levels of the mapping tree, the
//!   data space map's index, both ref-count trees, and the held snapshot's trees): checksum,
//!   block number, header, key order, keys within the parent's range, nodes at least a third
//!   full except tree roots, leaves at one depth, no cycles, no node shared between trees of
//!   different kinds;
//! - reference counts: every metadata and data block's count is recomputed from every
//!   reference and compared with both space maps as stored (bitmaps, ref-count trees), along
//!   with the index entries' free counts and the space maps' nr_allocated;
//! - thins: the same ids in the details and the mapping tree, `mapped_blocks` equal to the
//!   number of mappings, every mapped data block inside the data device.
//!
//! Counting follows persistent-data's sharing scheme: a btree node is counted once per
//! reference (parent entry or root pointer) and its subtree walked once; a data block once
//! per mapping leaf holding it, so a leaf shared by snapshots counts once.
//!
//! Stricter than thin_check 0.9.0, which passes damage to data reference counts,
//! `mapped_blocks` and index entries' free counts (tests/oracle.rs). Not checked: mapping times,
//! `metadata_nr_blocks` against the metadata space map's size (the kernel does not keep
//! them equal), the data block size beyond being nonzero.
//!
//! Invariants: every problem is reported with where it is, and the check goes on after it;
//! nothing on the device can make it panic, loop or read past the device (decoding is
//! bounds-checked, descent is bounded, counts saturate).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod counts;
mod node;
mod report;
mod space_maps;
mod superblock;
mod trees;
mod walk;

#[cfg(test)]
mod tests;

pub use report::{CheckReport, Problem, ProblemKind};

use crate::error::Space;
use crate::format::SUPERBLOCK_LOCATION;
use block_io::MetaDevice;
use std::sync::Arc;
use walk::Walker;

/// How to check.
#[derive(Clone, Default)]
pub struct CheckOptions {
    /// Don't walk the thins' mapping trees (fast, like `thin_check --skip-mappings`):
    /// reference counts, data blocks and `mapped_blocks` are then not checked.
    pub skip_mappings: bool,
    /// Called now and then with (metadata blocks read, metadata blocks in use), about every
    /// 1% of the total and at least every 256 blocks, and last with done == total. `total`
    /// stays the same throughout and `done` never goes down. With `skip_mappings` the
    /// mapping trees are not read, so `done` jumps to `total` at the end.
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
}

impl std::fmt::Debug for CheckOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckOptions")
            .field("skip_mappings", &self.skip_mappings)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

/// Checks the metadata on `dev` and reports every problem found.
pub fn check(dev: &dyn MetaDevice, opts: &CheckOptions) -> CheckReport {
    let mut report = CheckReport {
        skipped_mappings: opts.skip_mappings,
        ..CheckReport::default()
    };
    let sb = match superblock::read_current(dev) {
        Ok(sb) => sb,
        Err(p) => {
            report.problems.push(p);
            if let Some(f) = &opts.progress {
                f(1, 1);
            }
            return report;
        }
    };
    let (geometry, sb_problems) = superblock::geometry(&sb, dev.nr_blocks());
    let mut w = Walker::new(
        dev,
        geometry.nr_meta,
        geometry.nr_data,
        opts.progress.clone(),
    );
    for p in sb_problems {
        w.problems.push(p);
    }
    // The work is reading every block in use, each once (the few re-reads of small trees
    // are not counted past the total). The space map's own figure may be damaged: a total
    // past the metadata area would leave the bar at 0% to the end.
    w.set_progress_total(
        sb.metadata_sm_root
            .nr_allocated
            .clamp(1, geometry.nr_meta.max(1)),
    );
    w.meta.inc(SUPERBLOCK_LOCATION);

    // Count everything that references metadata blocks before comparing any count.
    let skip = opts.skip_mappings;
    trees::walk(&mut w, sb.device_details_root, sb.data_mapping_root, skip);
    let data_sm = space_maps::walk_data(&mut w, &sb.data_sm_root);
    let metadata_sm = space_maps::walk_metadata(&mut w, &sb.metadata_sm_root);
    let held = (sb.held_root != 0)
        .then(|| {
            w.scope = "held metadata snapshot: ";
            let copy = superblock::read_held(&mut w, sb.held_root);
            if let Some(copy) = &copy {
                trees::walk(
                    &mut w,
                    copy.device_details_root,
                    copy.data_mapping_root,
                    skip,
                );
            }
            w.scope = "";
            copy
        })
        .flatten();

    let totals = trees::check_thins(&mut w, sb.device_details_root, sb.data_mapping_root, skip);
    if let Some(copy) = &held {
        w.scope = "held metadata snapshot: ";
        trees::check_thins(
            &mut w,
            copy.device_details_root,
            copy.data_mapping_root,
            skip,
        );
        w.scope = "";
    }
    let compare = !skip;
    space_maps::check(
        &mut w,
        Space::Data,
        &sb.data_sm_root,
        geometry.nr_data,
        &data_sm,
        compare,
    );
    let meta_root = &sb.metadata_sm_root;
    space_maps::check(
        &mut w,
        Space::Metadata,
        meta_root,
        geometry.nr_meta,
        &metadata_sm,
        compare,
    );
    w.report_progress(true);

    w.problems.finish();
    report.problems = std::mem::take(&mut w.problems.list);
    report.nr_problems_omitted = w.problems.nr_omitted;
    report.notes = std::mem::take(&mut w.notes);
    report.nr_thins = totals.nr_thins;
    report.nr_mappings = totals.nr_mappings;
    report.nr_metadata_blocks_used = w.meta.nr_nonzero();
    report.nr_data_blocks_used = w.data.nr_nonzero();
    report.nr_metadata_blocks = sb.metadata_sm_root.nr_blocks;
    report.nr_data_blocks = sb.data_sm_root.nr_blocks;
    report.data_block_size_sectors = sb.data_block_size;
    report.transaction_id = sb.trans_id;
    report.time = sb.time;
    report.held_root = (sb.held_root != 0).then_some(sb.held_root);
    report.needs_check = sb.needs_check();
    report
}
