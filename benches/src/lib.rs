//! Helpers shared by the benchmarks in src/bin; `benches/run` builds and runs them all.
//!
//! Every result is one line on stdout that a script can pick out by its first word:
//! - `FIGURE name=<id> value=<number> unit=<unit>`: an absolute measurement;
//! - `RATIO name=<id> value=<number> goal=<number>`: ours against a reference (the raw
//!   device, or what dm-thin achieves), with the goal it should meet.
//!
//! Anything else a benchmark prints is commentary for people. Names are stable: a figure keeps
//! its name across runs so that runs can be compared; `--quick` runs print the same names from
//! smaller workloads, so only full runs are comparable with each other.

use std::time::{Duration, Instant};

/// Options every benchmark binary takes.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `--quick`: a smoke-sized run that checks the benchmark works, in seconds.
    pub quick: bool,
}

impl Options {
    /// Parses the process arguments; an unknown argument is an error, so a typo does not run
    /// the full benchmark by surprise.
    pub fn from_args() -> Self {
        let mut quick = false;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                other => {
                    eprintln!("unknown argument {other:?}; the only option is --quick");
                    std::process::exit(2);
                }
            }
        }
        Options { quick }
    }
}

/// Prints a `FIGURE` line. Values are printed with up to three decimals, trailing zeros cut.
pub fn figure(name: &str, value: f64, unit: &str) {
    println!("FIGURE name={name} value={} unit={unit}", number(value));
}

/// Prints a `RATIO` line.
pub fn ratio(name: &str, value: f64, goal: f64) {
    println!(
        "RATIO name={name} value={} goal={}",
        number(value),
        number(goal)
    );
}

fn number(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Runs `f` once and returns its result and how long it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// Operations per second for `n` operations done in `d`.
pub fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The median of some durations (the upper one of the middle two for an even count).
pub fn median(mut d: Vec<Duration>) -> Duration {
    assert!(!d.is_empty(), "median of nothing");
    d.sort();
    d[d.len() / 2]
}

/// A file in the temporary directory (`$TMPDIR`, else /tmp) that is removed when dropped.
#[derive(Debug)]
pub struct TempPath(std::path::PathBuf);

impl TempPath {
    /// A fresh path named after `what` and this process; nothing exists there yet.
    pub fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ublk-thin-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempPath(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_without_trailing_zeros() {
        assert_eq!(number(19.1), "19.1");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(0.12345), "0.123");
    }

    #[test]
    fn median_picks_the_middle() {
        let ms = |v: &[u64]| v.iter().map(|&x| Duration::from_millis(x)).collect();
        assert_eq!(median(ms(&[3, 1, 2])), Duration::from_millis(2));
        assert_eq!(median(ms(&[4, 1, 3, 2])), Duration::from_millis(3));
    }
}
