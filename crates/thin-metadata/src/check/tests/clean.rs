//! Metadata written through the public API checks clean, and the report's figures are right.

use super::*;
use std::sync::Mutex;

#[test]
fn fresh_pool_is_clean() {
    let (dev, md) = new_pool(1024, 1000);
    let r = check_dev(&dev);
    assert_clean(&r, "fresh pool");
    assert_eq!(
        (r.nr_thins, r.nr_mappings, r.nr_data_blocks_used),
        (0, 0, 0)
    );
    assert_eq!(r.nr_metadata_blocks, 1024);
    assert_eq!(r.nr_data_blocks, 1000);
    let st = md.status();
    assert_eq!(
        r.nr_metadata_blocks_used,
        st.nr_metadata_blocks - st.nr_free_metadata_blocks
    );
}

/// Random workloads with snapshots, deletes, discards, aborts, reopens and a held metadata
/// snapshot taken and dropped along the way; every commit must check clean, with the
/// figures of the model.
///
/// `CHECK_OPS` and `CHECK_VMAX` override the size of each workload (for longer searches).
#[test]
fn random_workloads_check_clean() {
    let nr_ops = env_or("CHECK_OPS", 1500);
    let vmax = env_or("CHECK_VMAX", 1500);
    for seed in seeds(0..12) {
        run_workload(seed, nr_ops as usize, vmax);
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |s| s.parse().expect("a number"))
}

fn run_workload(seed: u64, nr_ops: usize, vmax: u64) {
    workload(seed, nr_ops, vmax, |dev, md, model, when| {
        let report = check_dev(dev);
        assert_clean(&report, when);
        assert_eq!(report.nr_thins, model.len() as u64, "{when}");
        let nr_mappings: usize = model.values().map(BTreeSet::len).sum();
        assert_eq!(report.nr_mappings, nr_mappings as u64, "{when}");
        let st = md.status();
        let used_data = st.nr_data_blocks - st.nr_free_data_blocks;
        assert_eq!(report.nr_data_blocks_used, used_data, "{when}");
        assert_eq!(report.held_root, st.held_root, "{when}");
    });
}

/// Deep and wide trees: a thin with enough mappings for a three-level bottom tree, more
/// thins than a top-level or details leaf holds, snapshots sharing internal nodes, and
/// counts of 3 and more in both ref-count trees.
#[test]
fn big_trees_and_high_counts_check_clean() {
    let (dev, md) = new_pool(8192, 100_000);
    md.create_thin(ThinId(0)).unwrap();
    for v in 0..70_000 {
        write(&md, 0, v);
    }
    md.commit().unwrap();
    for snap in 1..=300 {
        md.create_snap(ThinId(snap), ThinId((snap - 1) % 4))
            .unwrap();
    }
    // Writes to the snapshots copy shared leaves, raising their data blocks' counts.
    for snap in 1..=4 {
        for v in (0..70_000).step_by(10_000) {
            write(&md, snap, v);
        }
    }
    md.commit().unwrap();
    let r = check_dev(&dev);
    assert_clean(&r, "big trees");
    assert_eq!(r.nr_thins, 301);
    assert_eq!(r.nr_mappings, 301 * 70_000);
    let sb = superblock(&dev);
    let bottom = nodes(&dev, thin_root(&dev, 0), 8);
    assert!(bottom.len() > 252, "thin 0's tree has three levels");
    assert!(
        nodes(&dev, sb.data_mapping_root, 8).len() > 1,
        "top level has internal nodes"
    );
    assert!(
        nodes(&dev, sb.device_details_root, 24).len() > 1,
        "details tree is split"
    );
    for root in [
        sb.data_sm_root.ref_count_root,
        sb.metadata_sm_root.ref_count_root,
    ] {
        let leaves = nodes(&dev, root, 4);
        assert!(
            leaves.iter().any(|(_, n)| n.nr_entries() > 0),
            "ref-count tree in use"
        );
    }
}

/// Space maps of several bitmaps each.
#[test]
fn multi_bitmap_space_maps_check_clean() {
    let (dev, md) = new_pool(17_000, 40_000);
    md.create_thin(ThinId(7)).unwrap();
    for v in 0..34_000 {
        write(&md, 7, v * 3);
    }
    md.commit().unwrap();
    md.remove_range(ThinId(7), VBlock(0), VBlock(3000)).unwrap();
    md.commit().unwrap();
    assert_eq!(metadata_bitmaps(&dev).len(), 2);
    assert_eq!(data_bitmaps(&dev).len(), 3);
    let r = check_dev(&dev);
    assert_clean(&r, "multi-bitmap space maps");
    assert_eq!(r.nr_mappings, 33_000);
}

#[test]
fn progress_ends_at_the_total_and_skip_mappings_stays_clean() {
    let (dev, _md) = pool_with_thin(2000);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let opts = CheckOptions {
        skip_mappings: false,
        progress: Some(Arc::new(move |done, total| {
            assert!(done <= total);
            seen.lock().unwrap().push((done, total));
        })),
    };
    assert_clean(&check(&*dev, &opts), "with progress");
    let calls = calls.lock().unwrap();
    let &(done, total) = calls.last().expect("progress was reported");
    assert_eq!(done, total);
    let skip = CheckOptions {
        skip_mappings: true,
        progress: None,
    };
    let r = check(&*dev, &skip);
    assert_clean(&r, "skip mappings");
    assert!(r.skipped_mappings);
    assert_eq!(r.nr_thins, 1);
}

#[test]
fn report_display_is_one_line_per_problem() {
    let (dev, _md) = pool_with_thin(300);
    let (leaf, _) = thin_leaves(&dev, 1)[1].clone();
    dev.patch(leaf, 2000, &[0xff]).unwrap();
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::Checksum, leaf);
    let line = p.to_string();
    assert!(line.starts_with(&format!("block {leaf} (path ")), "{line}");
    assert!(
        line.contains(&format!("-> {leaf}, keys ")) && line.contains("thin 1)"),
        "{line}"
    );
    assert!(!line.contains('\n'));
    assert!(r.to_string().lines().count() == r.problems.len() + 1);
}

/// Growing both spaces adds bitmaps (and index entries) that must check clean, before and
/// after they are used.
#[test]
fn resized_pools_check_clean() {
    let (dev, md) = new_pool(2048, 1000);
    md.create_thin(ThinId(1)).unwrap();
    for v in 0..900 {
        write(&md, 1, v);
    }
    md.commit().unwrap();
    md.grow_data(40_000).unwrap();
    md.commit().unwrap();
    assert_clean(&check_dev(&dev), "grown data, unused");
    for v in 900..34_000 {
        write(&md, 1, v);
    }
    md.commit().unwrap();
    assert_clean(&check_dev(&dev), "grown data, used");
    dev.grow(20_000);
    md.grow_metadata(20_000).unwrap();
    md.commit().unwrap();
    let r = check_dev(&dev);
    assert_clean(&r, "grown metadata");
    assert_eq!((r.nr_metadata_blocks, r.nr_data_blocks), (20_000, 40_000));
}

#[test]
fn edge_keys_flags_and_held_deletes_check_clean() {
    let (dev, md) = new_pool(2048, 1000);
    md.create_thin(ThinId(crate::MAX_THIN_ID)).unwrap();
    md.create_thin(ThinId(0)).unwrap();
    for v in [0, 1, u64::MAX - 1, u64::MAX] {
        write(&md, 0, v);
        write(&md, crate::MAX_THIN_ID, v);
    }
    md.create_snap(ThinId(5), ThinId(0)).unwrap();
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    // Deleting thins while the snapshot holds their trees, then dropping it.
    md.delete_thin(ThinId(0)).unwrap();
    md.delete_thin(ThinId(5)).unwrap();
    md.commit().unwrap();
    assert_clean(&check_dev(&dev), "deleted under a held snapshot");
    md.release_metadata_snap().unwrap();
    md.set_needs_check();
    md.commit().unwrap();
    let r = check_dev(&dev);
    assert_clean(&r, "released");
    assert!(r.needs_check);
    assert_eq!((r.nr_thins, r.nr_mappings, r.held_root), (1, 4, None));
}

/// Runs the check with a recording progress callback; returns the report and the calls.
fn check_recording_progress(dev: &MemMetaDevice, skip: bool) -> (CheckReport, Vec<(u64, u64)>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let opts = CheckOptions {
        skip_mappings: skip,
        progress: Some(Arc::new(move |done, total| {
            seen.lock().unwrap().push((done, total));
        })),
    };
    let report = check(dev, &opts);
    let calls = calls.lock().unwrap().clone();
    (report, calls)
}

#[track_caller]
fn assert_progress_well_formed(calls: &[(u64, u64)], what: &str) {
    let &(last_done, total) = calls.last().expect("progress was reported");
    assert_eq!(last_done, total, "{what}: ends at the total");
    assert!(
        calls.iter().all(|&(_, t)| t == total),
        "{what}: the total changed: {calls:?}"
    );
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "{what}: done went down: {calls:?}"
    );
    assert!(calls.iter().all(|&(d, t)| d <= t), "{what}: {calls:?}");
}

/// A progress bar moves steadily: about a report a percent, the total is the metadata
/// blocks in use, and the last report before the end is close to it (the total is a real
/// measure of the work, not a guess that leaves the bar short or jumping).
#[test]
fn progress_reports_blocks_read_along_the_way() {
    let (dev, md) = pool_with_thin(90_000);
    md.create_snap(ThinId(2), ThinId(1)).unwrap();
    for v in 0..3000 {
        write(&md, 2, 4 * v);
    }
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    let st = md.status();
    let in_use = st.nr_metadata_blocks - st.nr_free_metadata_blocks;

    let (report, calls) = check_recording_progress(&dev, false);
    assert_clean(&report, "with progress");
    assert_progress_well_formed(&calls, "full check");
    let total = calls[0].1;
    assert_eq!(total, in_use);
    assert!(
        calls.len() >= 50 && calls.len() <= 150,
        "{} reports",
        calls.len()
    );
    let before_last = calls[calls.len() - 2].0;
    assert!(
        before_last * 100 >= total * 95,
        "the walk read {before_last} of {total} blocks before the end"
    );

    let (report, calls) = check_recording_progress(&dev, true);
    assert_clean(&report, "skipping mappings, with progress");
    assert_progress_well_formed(&calls, "skip_mappings");
}

/// A damaged space-map figure cannot make the total exceed the metadata area, and a
/// superblock that cannot be read still ends the progress.
#[test]
fn progress_total_survives_damage() {
    let (dev, _md) = pool_with_thin(2000);
    let mut sb = superblock(&dev);
    sb.metadata_sm_root.nr_allocated = 1 << 60;
    dev.write_block(0, &sb.encode(0)).unwrap();
    let (_, calls) = check_recording_progress(&dev, false);
    assert_progress_well_formed(&calls, "damaged nr_allocated");
    assert_eq!(calls[0].1, dev.nr_blocks());

    dev.patch(0, 100, &[0xff]).unwrap();
    let (report, calls) = check_recording_progress(&dev, false);
    assert!(!report.is_clean());
    assert_eq!(calls, [(1, 1)]);
}
