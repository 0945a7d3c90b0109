//! The guest suite (tests/guest/run) as a cargo test: ublk-thin served as /dev/ublkbN for
//! real, in QEMU guests whose kernel has ublk_drv and dm-thin-pool.
//!
//! - It runs only with `UBLK_THIN_GUEST=1` (CI sets it): the suite boots a guest per
//!   scenario under emulation and takes minutes. Without it the test prints why it skips and
//!   passes, so a plain `cargo test` works on machines without QEMU.
//! - With `UBLK_THIN_GUEST=1` nothing is skipped: a missing prerequisite (QEMU, the kernel
//!   package, busybox) fails the test, and so does a scenario that reports `skip`.
//! - It passes only on positive evidence: the runner exits 0 and printed a `result=pass` line
//!   for every scenario it was asked to run.
//!
//! `UBLK_THIN_GUEST_SCENARIOS="a b"` runs only those scenarios (names of
//! tests/guest/scenarios/*.sh).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const ENABLE_ENV: &str = "UBLK_THIN_GUEST";
const SCENARIOS_ENV: &str = "UBLK_THIN_GUEST_SCENARIOS";

#[test]
fn guest_suite() {
    if std::env::var(ENABLE_ENV).map_or(true, |v| v != "1") {
        println!(
            "SKIP guest suite: {ENABLE_ENV} is not 1 (the suite boots QEMU guests for minutes; \
             bash .ci/run sets it)"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let runner = root.join("tests/guest/run");
    let selected: Vec<String> = std::env::var(SCENARIOS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = if selected.is_empty() {
        all_scenarios(&root.join("tests/guest/scenarios"))
    } else {
        selected.clone()
    };
    assert!(
        !expected.is_empty(),
        "no scenarios in tests/guest/scenarios"
    );

    let mut child = Command::new("bash")
        .arg(&runner)
        .args(&selected)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", runner.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut results = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("runner output is text");
        // The runner's stdout is its report; pass it on as it comes (CI greps it).
        println!("{line}");
        if let Some(rest) = line.strip_prefix("GUEST ") {
            results.push(parse_guest_line(rest));
        }
    }
    let status = child.wait().expect("wait for the guest runner");

    let mut problems = Vec::new();
    for name in &expected {
        match results.iter().find(|r| &r.0 == name) {
            None => problems.push(format!("{name}: no GUEST line")),
            Some((_, result)) if result != "pass" => {
                problems.push(format!("{name}: result={result}"))
            }
            Some(_) => {}
        }
    }
    if !status.success() {
        problems.push(format!("tests/guest/run exited with {status}"));
    }
    assert!(
        problems.is_empty(),
        "guest suite failed:\n  {}",
        problems.join("\n  ")
    );
}

/// `scenario=<name> result=<r> reason=...` -> (name, r).
fn parse_guest_line(rest: &str) -> (String, String) {
    let field = |key: &str| {
        rest.split(' ')
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("")
            .to_owned()
    };
    (field("scenario="), field("result="))
}

fn all_scenarios(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".sh").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}
