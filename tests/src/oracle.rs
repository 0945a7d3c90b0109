//! thin-provisioning-tools as oracles: finding them, running them, and thin-metadata's own
//! checker beside them.
//!
//! A missing tool skips an oracle test with a printed reason inside a plain `cargo test`;
//! with `REQUIRE_ORACLES=1` (which CI sets) it fails the test instead, so a CI image without
//! the tools cannot pass silently.

use block_io::MetaDevice;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use thin_metadata::check::{check, CheckOptions, Problem};

/// Set to 1 to turn a missing tool into a test failure.
pub const REQUIRE_ENV: &str = "REQUIRE_ORACLES";

/// Where Debian installs the tools; often not in a non-root PATH.
const EXTRA_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// The three tools, found.
#[derive(Debug, Clone)]
pub struct Tools {
    pub thin_check: PathBuf,
    pub thin_dump: PathBuf,
    pub thin_restore: PathBuf,
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.is_file()
                && Command::new(p)
                    .arg("-V")
                    .output()
                    .is_ok_and(|o| o.status.success())
        })
}

impl Tools {
    /// Finds the tools. When one is missing: panics under `REQUIRE_ORACLES=1`, otherwise
    /// prints why `test` is skipped and returns `None`.
    pub fn find(test: &str) -> Option<Tools> {
        let found = ["thin_check", "thin_dump", "thin_restore"].map(|n| (n, find_tool(n)));
        let missing: Vec<&str> = found
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| *n)
            .collect();
        if let [(_, Some(check)), (_, Some(dump)), (_, Some(restore))] = found {
            return Some(Tools {
                thin_check: check,
                thin_dump: dump,
                thin_restore: restore,
            });
        }
        let why = format!(
            "{} not found (or not runnable) in PATH, /usr/sbin or /sbin; install \
             thin-provisioning-tools (Debian: apt-get install thin-provisioning-tools)",
            missing.join(", ")
        );
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{test}: {REQUIRE_ENV}=1 but {why}");
        }
        println!("SKIP {test}: {why}; set {REQUIRE_ENV}=1 to make this a failure");
        None
    }

    /// `thin_check <file>`: Ok when it exits 0, else its output.
    pub fn check(&self, file: &Path) -> Result<(), String> {
        run(Command::new(&self.thin_check).arg(file)).map(drop)
    }

    /// `thin_dump <file>` (with `-m`: the held metadata snapshot); returns the XML.
    pub fn dump(&self, file: &Path, metadata_snap: bool) -> Result<String, String> {
        let mut cmd = Command::new(&self.thin_dump);
        if metadata_snap {
            cmd.arg("-m");
        }
        run(cmd.arg(file))
    }

    /// `thin_restore -i <xml> -o <out>`; `out` must exist with the metadata's size.
    pub fn restore(&self, xml: &Path, out: &Path) -> Result<(), String> {
        run(Command::new(&self.thin_restore)
            .arg("-i")
            .arg(xml)
            .arg("-o")
            .arg(out))
        .map(drop)
    }
}

/// Runs a command; Ok(stdout) on exit status 0, else a description with all its output.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Writes a whole metadata device to `file`, for the tools to read.
pub fn write_image(dev: &dyn MetaDevice, file: &Path) {
    let mut bytes = Vec::with_capacity(dev.nr_blocks() as usize * block_io::META_BLOCK_SIZE);
    let mut buf = [0u8; block_io::META_BLOCK_SIZE];
    for b in 0..dev.nr_blocks() {
        dev.read_block(b, &mut buf)
            .unwrap_or_else(|e| panic!("reading block {b} of the image: {e}"));
        bytes.extend_from_slice(&buf);
    }
    std::fs::write(file, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
}

/// Runs thin-metadata's own checker; returns its problems, one line each (empty when
/// clean).
pub fn our_check(dev: &dyn MetaDevice) -> Vec<String> {
    our_check_except(dev, |_| false)
}

/// `our_check`, leaving out problems `tolerate` accepts (known false positives only).
pub fn our_check_except(dev: &dyn MetaDevice, tolerate: fn(&Problem) -> bool) -> Vec<String> {
    let report = check(dev, &CheckOptions::default());
    let mut lines: Vec<String> = report
        .problems
        .iter()
        .filter(|p| !tolerate(p))
        .map(|p| p.to_string())
        .collect();
    if report.nr_problems_omitted > 0 {
        lines.push(format!("(and {} more)", report.nr_problems_omitted));
    }
    lines
}

/// thin_check runs on crash images, several at once: each run spends most of its ~40 ms
/// waiting for the kernel to tear down its AIO context, so overlapping them keeps checking
/// every image cheap. Runs complete oldest first.
#[derive(Debug)]
pub struct ThinCheckQueue<'a> {
    tools: &'a Tools,
    max_in_flight: usize,
    in_flight: VecDeque<PendingCheck>,
}

#[derive(Debug)]
struct PendingCheck {
    point: u64,
    child: Child,
    file: PathBuf,
    what: String,
}

/// A finished thin_check of one crash point.
#[derive(Debug)]
pub struct CheckOutcome {
    pub point: u64,
    /// The caller's description of the point, as given to `start`.
    pub what: String,
    /// Why thin_check rejected the image (its status and output); `None` when clean.
    pub rejected: Option<String>,
}

impl<'a> ThinCheckQueue<'a> {
    pub fn new(tools: &'a Tools, max_in_flight: usize) -> Self {
        ThinCheckQueue {
            tools,
            max_in_flight: max_in_flight.max(1),
            in_flight: VecDeque::new(),
        }
    }

    /// Writes `image` to `file` and starts thin_check on it. Returns the runs it had to wait
    /// for to stay within the bound.
    pub fn start(
        &mut self,
        point: u64,
        image: &dyn MetaDevice,
        file: PathBuf,
        what: &str,
    ) -> Vec<CheckOutcome> {
        let mut done = Vec::new();
        while self.in_flight.len() >= self.max_in_flight {
            done.extend(self.complete_oldest());
        }
        write_image(image, &file);
        let child = Command::new(&self.tools.thin_check)
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting thin_check: {e}"));
        self.in_flight.push_back(PendingCheck {
            point,
            child,
            file,
            what: what.to_string(),
        });
        done
    }

    /// Waits for every run still going.
    pub fn finish(&mut self) -> Vec<CheckOutcome> {
        let mut done = Vec::new();
        while let Some(outcome) = self.complete_oldest() {
            done.push(outcome);
        }
        done
    }

    /// Waits for the oldest run; a clean image's file is removed, a rejected one kept.
    fn complete_oldest(&mut self) -> Option<CheckOutcome> {
        let p = self.in_flight.pop_front()?;
        let out = p
            .child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for thin_check: {e}"));
        let rejected = if out.status.success() {
            let _ = std::fs::remove_file(&p.file);
            None
        } else {
            Some(format!(
                "thin_check failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        };
        Some(CheckOutcome {
            point: p.point,
            what: p.what,
            rejected,
        })
    }
}
