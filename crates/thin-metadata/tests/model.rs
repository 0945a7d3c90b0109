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
    let md = thin_metadata::ThinMetadata::open(w.dev.clone());
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
