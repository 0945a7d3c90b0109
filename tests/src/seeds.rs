//! Seeds for randomized tests: which ones run, and a failure message that says how to
//! replay the failing one.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// A number from the environment, if set (a malformed one is a test failure).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// Runs `f` for every seed: only `<PREFIX>_SEED` if set, else `0..<PREFIX>_SEEDS`, else
/// `0..default_seeds`. A panic inside `f` is re-raised naming the seed and how to replay it.
pub fn for_each_seed(test: &str, prefix: &str, default_seeds: u64, mut f: impl FnMut(u64)) {
    let one = format!("{prefix}_SEED");
    let seeds: Vec<u64> = match env_u64(&one) {
        Some(seed) => vec![seed],
        None => (0..env_u64(&format!("{prefix}_SEEDS")).unwrap_or(default_seeds)).collect(),
    };
    for seed in seeds {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(seed))) {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!(
                "{test} failed with seed {seed}; replay with {one}={seed} cargo test --release \
                 -p ublk-thin-tests {test} -- --nocapture\n{msg}"
            );
        }
    }
}
