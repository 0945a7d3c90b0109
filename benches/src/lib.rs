//! Benchmarks live in src/bin; `benches/run` runs them all.
