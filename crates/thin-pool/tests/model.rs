//! The seeded whole-pool model (`thin_pool::model`): many tasks in flight on several threads
//! issue random reads, writes, discards, write-zeroes, flushes, snapshots and deletes on
//! several thins, checked against a byte-level model of every thin (see `src/model.rs`).
//!
//! Each seed makes the model's input bytes. `THIN_POOL_MODEL_SEED=<n>` replays one seed;
//! `THIN_POOL_MODEL_SEEDS=<n>` runs seeds 0..n (default 4 in debug builds, 20 in release);
//! `THIN_POOL_MODEL_BYTES=<n>` sets the input size per seed (default 8000 in debug, 24000 in
//! release, about 6 bytes per request); `THIN_POOL_MODEL_TRACE=1` prints every operation.

use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::time::Instant;
use thin_pool::model::{run, Options};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// Prints the seed when a run panics, so that it can be replayed.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "thin-pool model failed at seed {0}: replay with THIN_POOL_MODEL_SEED={0} \
                 (add THIN_POOL_MODEL_TRACE=1 to see every operation)",
                self.0
            );
        }
    }
}

#[test]
fn whole_pool_model() {
    let release = !cfg!(debug_assertions);
    let seeds: Vec<u64> = match env_u64("THIN_POOL_MODEL_SEED") {
        Some(s) => vec![s],
        None => {
            (0..env_u64("THIN_POOL_MODEL_SEEDS").unwrap_or(if release { 20 } else { 4 })).collect()
        }
    };
    let nr_bytes = env_u64("THIN_POOL_MODEL_BYTES").unwrap_or(if release { 24000 } else { 8000 });
    let opts = Options {
        trace: std::env::var_os("THIN_POOL_MODEL_TRACE").is_some(),
        ..Options::default()
    };
    let t0 = Instant::now();
    let mut total_requests = 0;
    for seed in seeds.iter().copied() {
        let _guard = SeedGuard(seed);
        let mut rng = SmallRng::seed_from_u64(seed);
        let input: Vec<u8> = (0..nr_bytes).map(|_| rng.gen()).collect();
        let t = Instant::now();
        let s = run(&input, &opts);
        total_requests += s.requests();
        println!(
            "seed {seed}: {} phases, {} requests ({} writes, {} reads, {} foreign reads, {} \
             discards, {} write-zeroes, {} flushes), {} snapshots, {} deletes ({} refused \
             busy), {} creates, {} grows, {} reopens, ENOSPC data {} metadata {}, {} partial \
             failures, {} metadata grows, {:.2} s",
            s.phases,
            s.requests(),
            s.writes,
            s.reads,
            s.foreign_reads,
            s.discards,
            s.write_zeroes,
            s.flushes,
            s.snapshots,
            s.deletes,
            s.busy_deletes,
            s.creates,
            s.grows,
            s.reopens,
            s.no_data_space,
            s.no_metadata_space,
            s.partial_failures,
            s.metadata_grows,
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "MODEL seeds={} requests={total_requests} seconds={:.1}",
        seeds.len(),
        t0.elapsed().as_secs_f64()
    );
}
