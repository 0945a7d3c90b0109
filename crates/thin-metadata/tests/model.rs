//! The seeded model tests: random create/snap/delete/insert/remove/commit/abort/reopen,
//! held metadata snapshots, transaction ids and data growth against the naive model in
//! `common` (its header lists everything that is asserted).
//!
//! `metadata_matches_the_model` runs 25 seeds of 4000 operations (100,000 in all) over
//! varied shapes; `deep_trees_match_the_model` runs 2 seeds of 1500 operations that grow
//! mapping trees to three levels, which the random shapes rarely reach. Environment, with
//! prefix `THIN_MODEL` for the first and `THIN_MODEL_DEEP` for the second:
//! - `<PREFIX>_SEED=<n>` runs only seed n (a failure prints the variable to replay it);
//! - `<PREFIX>_SEEDS=<n>` runs seeds 0..n instead of the default count;
//! - `<PREFIX>_OPS=<n>` sets the operations per seed.
//!
//! Debug builds run smoke sizes by default (1000 operations a seed; one deep seed of 300,
//! without the depth assertion); CI runs the full sizes with `cargo test --release`.

#[allow(dead_code)] // Each test binary uses a different part of the shared model.
mod common;

use block_io::MemMetaDevice;
use common::blocks::{Kind, Tree};
use common::{Config, Stats, Workload};
use rand::{rngs::SmallRng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use thin_metadata::format::ENTRIES_PER_BITMAP;
use thin_metadata::ThinMetadata;

/// 64 MiB of metadata: room for every workload shape without running out.
const NR_META_BLOCKS: u64 = 16384;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

#[test]
fn metadata_matches_the_model() {
    let ops = if cfg!(debug_assertions) { 1000 } else { 4000 };
    let height = run_seeds(
        "metadata_matches_the_model",
        "THIN_MODEL",
        25,
        ops,
        Config::random,
    );
    assert!(height >= 2, "no workload grew a mapping tree past one leaf");
}

#[test]
fn deep_trees_match_the_model() {
    let (seeds, ops) = if cfg!(debug_assertions) {
        (1, 300)
    } else {
        (2, 1500)
    };
    let height = run_seeds(
        "deep_trees_match_the_model",
        "THIN_MODEL_DEEP",
        seeds,
        ops,
        Config::deep,
    );
    // Smaller or replayed runs need not get that deep.
    let defaults = ["SEED", "SEEDS", "OPS"]
        .iter()
        .all(|v| std::env::var(format!("THIN_MODEL_DEEP_{v}")).is_err());
    if defaults && !cfg!(debug_assertions) {
        assert!(
            height >= 3,
            "the deep workloads no longer grow three-level mapping trees"
        );
    }
}

/// Runs the seeds the environment asks for (see the header); returns the highest mapping
/// tree any seed ended with. Prints one summary line.
fn run_seeds(
    test: &str,
    prefix: &str,
    default_seeds: u64,
    default_ops: u64,
    shape: fn(&mut SmallRng) -> Config,
) -> usize {
    let ops = env_u64(&format!("{prefix}_OPS")).unwrap_or(default_ops);
    let seeds: Vec<u64> = match env_u64(&format!("{prefix}_SEED")) {
        Some(seed) => vec![seed],
        None => (0..env_u64(&format!("{prefix}_SEEDS")).unwrap_or(default_seeds)).collect(),
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut max_height = 0;
    for &seed in &seeds {
        let run = catch_unwind(AssertUnwindSafe(|| run_seed(seed, ops, shape)));
        let (stats, height) = run.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!(
                "{test} failed with seed {seed}; replay with {prefix}_SEED={seed} \
                 {prefix}_OPS={ops} cargo test --release -p thin-metadata --test model \
                 {test}:\n{msg}"
            )
        });
        total.add(&stats);
        max_height = max_height.max(height);
    }
    println!(
        "MODEL test={test} seeds={} {total} max_mapping_tree_height={max_height} secs={:.1}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    max_height
}

/// Runs one seed: random operations, then a final commit, reopen and full comparison.
/// Returns the counts and the height of the highest mapping tree.
fn run_seed(seed: u64, ops: u64, shape: fn(&mut SmallRng) -> Config) -> (Stats, usize) {
    let cfg = shape(&mut SmallRng::seed_from_u64(!seed));
    let dev = Arc::new(MemMetaDevice::new(NR_META_BLOCKS));
    let mut w = Workload::format(dev, cfg, seed);
    for _ in 0..ops {
        w.step();
    }
    w.verify_all();
    w.commit();
    w.verify_all();
    let md = ThinMetadata::open(w.dev.clone());
    w.md = md.unwrap_or_else(|e| w.fail(format!("final open failed: {e}")));
    w.verify_all();
    w.check_committed();
    // The trees must also decode with the format decoders alone.
    let blocks = common::blocks::classify(&*w.dev).unwrap_or_else(|e| {
        w.fail(format!(
            "walking the metadata with the format decoders: {e}"
        ))
    });
    let height = blocks
        .values()
        .filter(|i| {
            matches!(
                i.kind,
                Kind::Node {
                    tree: Tree::Mapping,
                    ..
                }
            )
        })
        .map(|i| i.depth + 1)
        .max()
        .unwrap_or(0);
    (w.stats, height)
}

/// Growing the metadata device under a workload: whenever free metadata runs low the device
/// and then the metadata space grow (doubling, so the space crosses into a second bitmap at
/// 16320 blocks) and the growth is committed; the model must keep matching, reopens must
/// show the new size, and the checker must stay clean. `THIN_MODEL_GROW_SEED` replays one
/// seed.
#[test]
fn metadata_growth_keeps_the_model() {
    let seeds: Vec<u64> = match env_u64("THIN_MODEL_GROW_SEED") {
        Some(seed) => vec![seed],
        None => (0..3).collect(),
    };
    let ops = if cfg!(debug_assertions) { 600 } else { 3000 };
    let (mut grown, mut largest) = (0, 0);
    for seed in seeds {
        let run = catch_unwind(AssertUnwindSafe(|| grow_seed(seed, ops)));
        let (n, size) = run.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!(
                "metadata_growth_keeps_the_model failed with seed {seed}; replay with \
                 THIN_MODEL_GROW_SEED={seed}:\n{msg}"
            )
        });
        grown += n;
        largest = largest.max(size);
    }
    println!("MODEL test=metadata_growth_keeps_the_model grown={grown} largest={largest}");
    assert!(
        largest > ENTRIES_PER_BITMAP,
        "the metadata never grew into a second bitmap"
    );
}

/// Returns how many times the metadata grew, and its final size.
fn grow_seed(seed: u64, ops: u64) -> (u64, u64) {
    let dev = Arc::new(MemMetaDevice::new(200));
    let cfg = Config {
        nr_data_blocks: 60_000,
        max_vblock: 5000,
        nr_thin_ids: 6,
        max_run: 300,
        shrink_rarity: 3,
        commit_ops: true,
        cache_nodes: None,
    };
    let mut w = Workload::format(dev.clone(), cfg, seed);
    let mut grown = 0;
    for i in 0..ops {
        w.step();
        let s = w.md.status();
        let cur = s.nr_metadata_blocks;
        // Double when running low; besides, step through sizes that add bitmaps.
        let new = if i % 20 == 0 && s.nr_free_metadata_blocks < s.metadata_reserve_blocks + 300 {
            cur * 2
        } else if i % (ops / 4) == ops / 4 - 1 {
            [cur, 1600, ENTRIES_PER_BITMAP + 1000, 40_000][(i / (ops / 4)) as usize % 4]
        } else {
            cur
        };
        let new = new.min(40_000);
        if new > cur {
            dev.grow(new);
            let r = w.md.grow_metadata(new);
            if let Err(e) = r {
                w.fail(format!("grow_metadata({new}) failed: {e}"));
            }
            w.commit();
            grown += 1;
            let md = ThinMetadata::open(w.dev.clone())
                .unwrap_or_else(|e| w.fail(format!("reopen after growing: {e}")));
            if md.status().nr_metadata_blocks != new {
                w.fail(format!("reopened metadata lost its growth to {new} blocks"));
            }
            w.md = md;
            w.verify_all();
            w.check_committed();
        }
    }
    w.commit();
    w.verify_all();
    w.check_committed();
    (grown, w.md.status().nr_metadata_blocks)
}

/// Regression test: giving back a data block that is not allocated (a caller's double
/// release) is reported as `Error::Corrupt { block: <the data block>, .. }` ("metadata block
/// 5 is corrupt: data block 5 is released but its reference count is 0"), though nothing on
/// disk is damaged and `block` is documented as a metadata block. A pool that reacts to
/// `is_corrupt()` (needs_check, read-only) would do so for its own bug; the same goes for a
/// block past the end of the data space. Expected: `InvalidArgument`, as `insert` gives for
/// an unallocated block.
#[test]
fn releasing_an_unallocated_data_block_is_a_caller_error() {
    use thin_metadata::{DataBlock, Error, FormatOptions};
    let dev = Arc::new(MemMetaDevice::new(1024));
    let opts = FormatOptions {
        data_block_size_sectors: 128,
        nr_data_blocks: 100,
    };
    let md = ThinMetadata::format(dev, opts).expect("format");
    for block in [5, 100, 1 << 30] {
        let r = md.release_data_block(DataBlock(block));
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "release_data_block({block}) of an unallocated block gave {r:?}"
        );
    }
    let b = md.alloc_data_block().expect("alloc");
    md.release_data_block(b).expect("first release");
    let r = md.release_data_block(b);
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "a second release of data block {} gave {r:?}",
        b.0
    );
}

/// The needs_check flag survives a commit and a reopen, refuses every change with
/// `NeedsCheck` while lookups go on, and clearing it makes the metadata writable again.
#[test]
fn needs_check_refuses_changes_until_cleared() {
    use thin_metadata::{Error, FormatOptions, Lookup, ThinId, VBlock};
    let dev = Arc::new(MemMetaDevice::new(1024));
    let opts = FormatOptions {
        data_block_size_sectors: 128,
        nr_data_blocks: 100,
    };
    let md = ThinMetadata::format(dev.clone(), opts).expect("format");
    md.create_thin(ThinId(1)).expect("create");
    let b = md.alloc_data_block().expect("alloc");
    md.insert(ThinId(1), VBlock(7), b).expect("insert");
    md.set_needs_check();
    md.commit().expect("commit with the flag");
    let md = ThinMetadata::open(dev.clone()).expect("reopen");
    assert!(md.status().needs_check, "the flag must survive a reopen");
    let refused = [
        md.create_thin(ThinId(2)).err(),
        md.alloc_data_block().err(),
        md.remove(ThinId(1), VBlock(7)).err(),
        md.delete_thin(ThinId(1)).err(),
        md.set_transaction_id(0, 1).err(),
    ];
    for r in refused {
        assert!(matches!(r, Some(Error::NeedsCheck)), "a change gave {r:?}");
    }
    let found = md.lookup(ThinId(1), VBlock(7)).expect("lookups go on");
    assert!(matches!(found, Lookup::Provisioned { data_block, .. } if data_block == b));
    md.clear_needs_check();
    md.commit().expect("commit without the flag");
    let md = ThinMetadata::open(dev).expect("reopen");
    assert!(!md.status().needs_check);
    md.create_thin(ThinId(2)).expect("writable again");
}
