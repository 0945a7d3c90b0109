//! Crash test: random workloads (the model test's) on a `FaultyMetaDevice`, crashed at
//! seeded points during and after commits. After every crash the image must reopen as
//! exactly the last committed state, or, when the crash hit after the commit had issued its
//! superblock write, as exactly one of the previous and the new committed state; and both
//! thin_check and our check must find it clean.
//!
//! Crash points come in three flavours:
//! - inside a commit that succeeds: a wrapper device takes `crash_image` just before chosen
//!   operations (and around the superblock write), so the commit itself runs to the end;
//! - inside a commit that fails: a fault rule (`AfterOps`, `NthWrite`, `NthFlush`) stops the
//!   commit part-way, the metadata must then refuse changes, and the crash image is taken;
//! - after a commit returned Ok: the new state must survive (else `lost_committed`).
//!
//! After a failed commit, and now and then after a mid-commit crash, the workload goes on
//! from the crash image, so recovery itself is crashed again later.
//!
//! Prints `CRASH points=N inconsistent=N lost_committed=N` (run with --nocapture) and fails
//! unless both counters are 0. Environment: `CRASH_POINTS=<n>` (default 1000) crash points
//! in all; `CRASH_SEED=<n>` runs only that seed (with all the points); `CRASH_SEEDS=<n>`
//! runs seeds 0..n (default 4), sharing the points.

use block_io::{CrashConfig, Fault, FaultyMetaDevice, MemMetaDevice, MetaBlock, MetaDevice};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;
use thin_metadata::{Error, ThinId, ThinMetadata};
use ublk_thin_tests::model::{compare_state, Config, Model, State, Workload};
use ublk_thin_tests::oracle::{our_check, CheckOutcome, ThinCheckQueue, Tools};
use ublk_thin_tests::scratch::ScratchDir;
use ublk_thin_tests::seeds::{env_u64, for_each_seed};

/// 2 MiB of metadata: small, so that thin_check on every image stays cheap.
const NR_META_BLOCKS: u64 = 512;
/// Crash points reported individually before the rest are only counted.
const MAX_REPORTED: u64 = 20;

/// Which committed states a crash image may show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Allowed {
    /// The superblock write had not been issued: only the previous state.
    Previous,
    /// The superblock write was issued but not flushed: exactly one of the two.
    Either,
    /// The commit returned Ok: only the new state.
    New,
}

/// A crash image taken by the tap, and whether the superblock write had been issued.
struct Capture {
    image: MemMetaDevice,
    superblock_issued: bool,
    what: String,
}

#[derive(Default)]
struct TapState {
    armed: bool,
    /// Operations since `arm`.
    nr_ops: u64,
    nr_writes: u64,
    /// Take a crash image just before these operations.
    at_ops: BTreeSet<u64>,
    /// Take crash images just before and just after the superblock write.
    around_superblock: bool,
    superblock_issued: bool,
    crash_seed: u64,
    captures: Vec<Capture>,
}

/// Forwards to a `FaultyMetaDevice`, counting a commit's operations and taking crash
/// images at chosen ones without disturbing it.
struct Tap {
    dev: Arc<FaultyMetaDevice>,
    st: Mutex<TapState>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("dev", &self.dev).finish()
    }
}

fn crash_config(seed: u64) -> CrashConfig {
    let mut rng = SmallRng::seed_from_u64(seed);
    CrashConfig {
        keep_probability: [0.1, 0.5, 0.9][rng.gen_range(0..3)],
        tear_probability: [0.25, 0.75][rng.gen_range(0..2)],
    }
}

impl Tap {
    /// A panic while locked fails the test anyway, so poisoning carries no news.
    fn lock(&self) -> MutexGuard<'_, TapState> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn new(dev: FaultyMetaDevice) -> Arc<Self> {
        Arc::new(Tap {
            dev: Arc::new(dev),
            st: Mutex::new(TapState::default()),
        })
    }

    fn arm(&self, at_ops: BTreeSet<u64>, around_superblock: bool, crash_seed: u64) {
        *self.lock() = TapState {
            armed: true,
            at_ops,
            around_superblock,
            crash_seed,
            ..TapState::default()
        };
    }

    /// Stops capturing; returns (operations, writes, superblock issued, captures).
    fn disarm(&self) -> (u64, u64, bool, Vec<Capture>) {
        let mut st = self.lock();
        st.armed = false;
        let captures = std::mem::take(&mut st.captures);
        (st.nr_ops, st.nr_writes, st.superblock_issued, captures)
    }

    fn capture(&self, st: &mut TapState, what: String) {
        st.crash_seed = st.crash_seed.wrapping_add(1);
        let seed = st.crash_seed;
        st.captures.push(Capture {
            image: self.dev.crash_image_with(seed, crash_config(seed)),
            superblock_issued: st.superblock_issued,
            what,
        });
    }

    /// Called before each operation; `superblock` when it is a write of block 0.
    fn before(&self, superblock: bool, write: bool) {
        let mut st = self.lock();
        if !st.armed {
            return;
        }
        let op = st.nr_ops;
        if st.at_ops.contains(&op) {
            self.capture(&mut st, format!("before operation {op}"));
        } else if superblock && st.around_superblock {
            self.capture(&mut st, "before the superblock write".into());
        }
        st.nr_ops += 1;
        st.nr_writes += u64::from(write);
    }

    fn after_superblock_write(&self) {
        let mut st = self.lock();
        if !st.armed {
            return;
        }
        st.superblock_issued = true;
        if st.around_superblock {
            self.capture(&mut st, "after the superblock write".into());
        }
    }
}

impl MetaDevice for Tap {
    fn nr_blocks(&self) -> u64 {
        self.dev.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        self.before(false, false);
        self.dev.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        self.before(block == 0, true);
        self.dev.write_block(block, buf)?;
        if block == 0 {
            self.after_superblock_write();
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.before(false, false);
        self.dev.flush()
    }
}

#[derive(Debug, Default)]
struct Totals {
    points: u64,
    inconsistent: u64,
    lost_committed: u64,
    mid_commit: u64,
    failed_commits: u64,
    after_commit: u64,
    showed_previous: u64,
    showed_new: u64,
    restarts: u64,
    thin_check_runs: u64,
}

/// thin_check runs in flight at once. Each run spends most of its ~40 ms waiting for the
/// kernel to tear down its AIO context, so overlapping them keeps checking every image cheap.
const MAX_CHECKS_IN_FLIGHT: usize = 16;

/// Judges crash images: opens them, compares with the allowed states, runs our check and
/// (concurrently) thin_check on each, and keeps the counts.
struct Judge<'a> {
    checks: Option<ThinCheckQueue<'a>>,
    dir: &'a ScratchDir,
    totals: &'a mut Totals,
    seed: u64,
    /// Points already counted as inconsistent or lost_committed.
    failed_points: HashSet<u64>,
}

impl Judge<'_> {
    /// Counts a failed crash point once, however many ways it failed, and reports it.
    fn record_failure(&mut self, point: u64, lost: bool, what: &str, reason: &str) {
        let first = self.failed_points.insert(point);
        if !first {
            println!(
                "CRASH-FAIL (same point) seed={} {what}: {reason}",
                self.seed
            );
            return;
        }
        let n = if lost {
            self.totals.lost_committed += 1;
            self.totals.lost_committed
        } else {
            self.totals.inconsistent += 1;
            self.totals.inconsistent
        };
        if self.totals.inconsistent + self.totals.lost_committed <= MAX_REPORTED {
            let kind = if lost {
                "lost_committed"
            } else {
                "inconsistent"
            };
            println!("CRASH-FAIL {kind} #{n} seed={} {what}: {reason}", self.seed);
        }
    }

    /// Opens and checks one crash image; returns the state it shows, if it is a valid one.
    /// A thin_check failure is counted when it completes (at the latest in `finish`).
    fn judge(
        &mut self,
        image: &MemMetaDevice,
        prev: &State,
        new: &State,
        allowed: Allowed,
        what: &str,
    ) -> Option<State> {
        self.totals.points += 1;
        let what = format!("point={} ({what}, allowed {allowed:?})", self.totals.points);
        let point = self.totals.points;
        self.start_thin_check(point, image, &what);
        match examine(image, prev, new, allowed) {
            Ok(shown) => {
                if shown.same_as(prev) && !shown.same_as(new) {
                    self.totals.showed_previous += 1;
                } else {
                    self.totals.showed_new += 1;
                }
                Some(shown)
            }
            Err((lost, reason)) => {
                self.record_failure(point, lost, &what, &reason);
                None
            }
        }
    }

    fn start_thin_check(&mut self, point: u64, image: &MemMetaDevice, what: &str) {
        let Some(checks) = &mut self.checks else {
            return;
        };
        let file = self.dir.join(&format!("crash-{point}.bin"));
        let done = checks.start(point, image, file, what);
        self.count_checks(done);
    }

    /// Waits for every thin_check still running.
    fn finish(&mut self) {
        if let Some(checks) = &mut self.checks {
            let done = checks.finish();
            self.count_checks(done);
        }
    }

    fn count_checks(&mut self, done: Vec<CheckOutcome>) {
        for c in done {
            self.totals.thin_check_runs += 1;
            if let Some(reason) = c.rejected {
                self.record_failure(c.point, false, &c.what, &reason);
            }
        }
    }
}

/// Our check, then open and compare. Err((lost_committed, reason)).
fn examine(
    image: &MemMetaDevice,
    prev: &State,
    new: &State,
    allowed: Allowed,
) -> Result<State, (bool, String)> {
    let problems = our_check(image);
    if !problems.is_empty() {
        return Err((false, format!("our check: {problems:?}")));
    }
    let dev: Arc<dyn MetaDevice> = Arc::new(MemMetaDevice::from_bytes(&image.to_bytes()));
    let md = ThinMetadata::open(dev).map_err(|e| (false, format!("open failed: {e}")))?;
    let is_prev = compare_state(&md, prev, 0);
    let is_new = compare_state(&md, new, 0);
    match (allowed, is_prev.is_ok(), is_new.is_ok()) {
        (Allowed::Previous | Allowed::Either, true, _) => Ok(prev.clone()),
        (Allowed::New | Allowed::Either, _, true) => Ok(new.clone()),
        (Allowed::New, true, false) => Err((true, "shows the previous state".into())),
        (Allowed::Previous, false, true) => Err((
            false,
            "shows the new state before its superblock was written".into(),
        )),
        (_, _, _) => Err((
            false,
            format!(
                "shows neither state: vs previous: {}; vs new: {}",
                is_prev.err().unwrap_or_default(),
                is_new.err().unwrap_or_default()
            ),
        )),
    }
}

/// One seed's run: the workload, its device, and what the next commit is expected to cost.
struct Run<'a> {
    w: Workload,
    tap: Arc<Tap>,
    rng: SmallRng,
    cfg: Config,
    /// Operations and writes of the last commit, to aim crash points inside the next one.
    est_ops: u64,
    est_writes: u64,
    crash_seed: u64,
    judge: Judge<'a>,
}

impl Run<'_> {
    /// Crashes inside a commit that runs to the end, and after it.
    fn crash_during_successful_commit(&mut self, prev: &State, new: &State) {
        let span = self.est_ops + self.est_ops / 3 + 4;
        let at: BTreeSet<u64> = (0..self.rng.gen_range(1..4))
            .map(|_| self.rng.gen_range(0..span))
            .collect();
        self.tap.arm(at, self.rng.gen_bool(0.5), self.crash_seed);
        let r = self.w.md.commit();
        let (nr_ops, nr_writes, _, captures) = self.tap.disarm();
        (self.est_ops, self.est_writes) = (nr_ops.max(4), nr_writes.max(2));
        if let Err(e) = r {
            self.w.fail(format!("commit without faults failed: {e}"));
        }
        self.w.model.commit();
        let mut shown = Vec::new();
        for c in &captures {
            let allowed = if c.superblock_issued {
                Allowed::Either
            } else {
                Allowed::Previous
            };
            self.judge.totals.mid_commit += 1;
            if let Some(st) = self.judge.judge(&c.image, prev, new, allowed, &c.what) {
                shown.push((c, st));
            }
        }
        self.crash_after_commit(prev, new);
        // Now and then carry on from a mid-commit crash instead.
        if !shown.is_empty() && self.rng.gen_bool(0.2) {
            let (c, st) = shown.swap_remove(self.rng.gen_range(0..shown.len()));
            self.restart(&c.image, st);
        }
    }

    /// A crash after a commit returned Ok: only the new state may show.
    fn crash_after_commit(&mut self, prev: &State, new: &State) {
        let seed = self.crash_seed;
        let image = self.tap.dev.crash_image_with(seed, crash_config(seed));
        self.judge.totals.after_commit += 1;
        let what = "after the commit returned";
        self.judge.judge(&image, prev, new, Allowed::New, what);
    }

    /// A commit stopped part-way by an I/O error, then a crash, then recovery from it.
    fn crash_during_failed_commit(&mut self, prev: &State, new: &State) {
        let fault = match self.rng.gen_range(0..3) {
            0 => Fault::AfterOps(self.rng.gen_range(0..self.est_ops + 4)),
            1 => Fault::NthWrite(self.rng.gen_range(1..self.est_writes + 3)),
            _ => Fault::NthFlush(self.rng.gen_range(1..=2)),
        };
        self.tap.arm(BTreeSet::new(), false, self.crash_seed);
        self.tap.dev.add_fault(fault);
        let r = self.w.md.commit();
        self.tap.dev.clear_faults();
        let (_, _, superblock_issued, _) = self.tap.disarm();
        let e = match r {
            Ok(()) => {
                // The fault lay beyond the commit's last operation.
                self.w.model.commit();
                self.crash_after_commit(prev, new);
                return;
            }
            Err(e) => e,
        };
        if !matches!(e, Error::Io { .. }) {
            self.w.fail(format!(
                "commit under {fault:?} failed with a non-I/O error: {e}"
            ));
        }
        if self.w.md.create_thin(ThinId(1 << 22)).is_ok() {
            self.w.fail(format!(
                "metadata accepts changes after a failed commit ({e})"
            ));
        }
        self.judge.totals.failed_commits += 1;
        let allowed = if superblock_issued {
            Allowed::Either
        } else {
            Allowed::Previous
        };
        let seed = self.crash_seed;
        let image = self.tap.dev.crash_image_with(seed, crash_config(seed));
        let what = format!("commit failed under {fault:?}");
        match self.judge.judge(&image, prev, new, allowed, &what) {
            Some(st) => self.restart(&image, st),
            // Already counted as a failure; carry on from fresh metadata.
            None => {
                self.tap = Tap::new(FaultyMetaDevice::new(NR_META_BLOCKS));
                self.w = Workload::format(self.tap.clone(), self.cfg, seed);
            }
        }
    }

    /// Continues the workload from a crash image showing committed state `st`.
    fn restart(&mut self, image: &MemMetaDevice, st: State) {
        self.judge.totals.restarts += 1;
        let tap = Tap::new(FaultyMetaDevice::from_image(image));
        let md = ThinMetadata::open(tap.clone())
            .unwrap_or_else(|e| self.w.fail(format!("reopening a judged crash image: {e}")));
        self.w.md = md;
        self.w.dev = tap.clone();
        self.w.model = Model::new(st);
        self.tap = tap;
    }
}

fn run_seed(seed: u64, nr_points: u64, tools: Option<&Tools>, totals: &mut Totals) {
    let dir = ScratchDir::new("crash");
    let mut rng = SmallRng::seed_from_u64(!seed);
    let cfg = Config {
        nr_data_blocks: 3000,
        max_vblock: 1500,
        nr_thin_ids: 5,
        max_run: 48,
        shrink_rarity: 1,
        commit_ops: false,
        cache_nodes: rng.gen_bool(0.5).then_some(64),
    };
    let tap = Tap::new(FaultyMetaDevice::new(NR_META_BLOCKS));
    let end = totals.points + nr_points;
    let mut run = Run {
        w: Workload::format(tap.clone(), cfg, seed),
        tap,
        rng,
        cfg,
        est_ops: 40,
        est_writes: 30,
        crash_seed: seed << 32,
        judge: Judge {
            checks: tools.map(|t| ThinCheckQueue::new(t, MAX_CHECKS_IN_FLIGHT)),
            dir: &dir,
            totals,
            seed,
            failed_points: HashSet::new(),
        },
    };
    while run.judge.totals.points < end {
        for _ in 0..run.rng.gen_range(1..40) {
            run.w.step();
        }
        run.w.release_pending();
        let prev = run.w.model.committed.clone();
        let new = run.w.model.cur.clone();
        run.crash_seed += 1000;
        if run.rng.gen_bool(0.7) {
            run.crash_during_successful_commit(&prev, &new);
        } else {
            run.crash_during_failed_commit(&prev, &new);
        }
    }
    run.judge.finish();
}

#[test]
fn crashes_leave_exactly_a_committed_state() {
    let test = "crashes_leave_exactly_a_committed_state";
    // The tools are optional here: without them the image checks are ours alone.
    let tools = Tools::find(test);
    let points = env_u64("CRASH_POINTS").unwrap_or(1000);
    let nr_seeds = if env_u64("CRASH_SEED").is_some() {
        1
    } else {
        env_u64("CRASH_SEEDS").unwrap_or(4).max(1)
    };
    let started = Instant::now();
    let mut totals = Totals::default();
    for_each_seed(test, "CRASH", nr_seeds, |seed| {
        run_seed(seed, points.div_ceil(nr_seeds), tools.as_ref(), &mut totals);
    });
    let t = &totals;
    println!(
        "CRASH points={} inconsistent={} lost_committed={}",
        t.points, t.inconsistent, t.lost_committed
    );
    println!(
        "CRASH-DETAIL mid_commit={} failed_commits={} after_commit={} showed_previous={} \
         showed_new={} restarts={} thin_check_runs={} secs={:.1}",
        t.mid_commit,
        t.failed_commits,
        t.after_commit,
        t.showed_previous,
        t.showed_new,
        t.restarts,
        t.thin_check_runs,
        started.elapsed().as_secs_f64()
    );
    assert!(
        t.inconsistent == 0 && t.lost_committed == 0,
        "{} inconsistent and {} lost_committed crash points (CRASH-FAIL lines above name \
         the seeds; replay one with CRASH_SEED=<seed> CRASH_POINTS={points})",
        t.inconsistent,
        t.lost_committed
    );
}
