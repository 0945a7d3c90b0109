//! Crash test of the whole pool: a seeded workload of concurrent requests (partial and whole
//! block writes, FUA writes, discards, write-zeroes, flushes, reads), snapshots, creates and
//! deletes runs on a `FaultyMetaDevice` and a `FaultyDataDevice`; at seeded points both
//! devices are crashed (each keeps its flushed writes and a random, partly torn subset of the
//! unflushed ones), the pool is reopened from the two images and judged:
//!
//! - `inconsistent`: our check or `thin_check` rejects the metadata image, the pool does not
//!   open, a thin appears that never existed, or our check rejects the metadata after the
//!   reopened pool finished its recovery (reserve re-zeroing, freeing deleted thins) and closed;
//! - `lost_flushed`: a sector does not read back a version the model allows, although it has
//!   one that is not zero: the write acknowledged before the thin's last completed flush (or a
//!   FUA write) or any later write; or a thin whose creation a completed flush covered is gone;
//! - `foreign_reads`: a sector carries the tag of a write this thin never saw (written to
//!   another thin, or to its origin after the snapshot was taken);
//! - `nonzero_unprovisioned`: a sector whose only allowed content is zeros (never written in
//!   the thin's lineage, or discarded / write-zeroed with that flushed) reads something else.
//!
//! Every 512-byte sector a write puts down is tagged (write serial, writing thin, sector) and
//! filled with bytes derived from the tag, so a read names exactly which write it came from.
//!
//! Crash points, and why each is one instant for both devices: images are taken under the lock
//! of `Tap`, the metadata device wrapper through which every metadata write and flush passes
//! (holding that lock across the operation), so no metadata operation runs between the
//! metadata image and the data image; data writes or a data flush in between leave the
//! metadata image valid for the later instant. A logical clock ticks at every request's issue
//! and completion; an image pair is bracketed by two ticks (`cut_start`, `cut_end`): a flush
//! that completed before `cut_start` must be honoured, a write issued after `cut_end` cannot
//! show. Points come from three places: inside commits (the tap, before a chosen metadata
//! write or flush), in the middle of a batch of requests, and between batches.
//!
//! Now and then the workload carries on from a judged crash image, so recovery is crashed too.
//!
//! Prints `CRASH points=N inconsistent=N lost_flushed=N foreign_reads=N
//! nonzero_unprovisioned=N` (run with --nocapture) and fails unless every counter is 0.
//! Environment: `POOL_CRASH_POINTS` (default 1000 in release, 60 in debug builds; 20000 for
//! a long run), `POOL_CRASH_SEEDS` (default 4, sharing the points), `POOL_CRASH_SEED` (one
//! seed with all the points), `POOL_CRASH_THIN_CHECK_EVERY` (thin_check every Nth point,
//! default 1: every point). Threads make a replay follow the same workload, not the same
//! interleaving.

use block_io::data::{rt, DataGeometry, DataOp, FaultyDataDevice, IoBuf, MemDataDevice};
use block_io::{CrashConfig, FaultyMetaDevice, MemMetaDevice, MetaBlock, MetaDevice};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use thin_metadata::{Lookup, ThinId, ThinMetadata, VBlock};
use thin_pool::{NoSpacePolicy, Pool, PoolConfig, Thin};
use ublk_thin_tests::oracle::{our_check, CheckOutcome, ThinCheckQueue, Tools};
use ublk_thin_tests::scratch::ScratchDir;
use ublk_thin_tests::seeds::{env_u64, for_each_seed};

const SECTOR: usize = 512;
/// 2 MiB of metadata: small, so thin_check on every image stays cheap.
const NR_META_BLOCKS: u64 = 512;
/// Failing points reported in full before the rest are only counted.
const MAX_REPORTED: u64 = 20;
/// thin_check runs in flight at once (each mostly waits for the kernel).
const MAX_CHECKS_IN_FLIGHT: usize = 8;
/// Thins alive at once.
const MAX_LIVE_THINS: usize = 4;
const TAG_MAGIC: u64 = 0x5448_494e_4352_5348;

// ---------------------------------------------------------------------------------------
// Sector contents

/// The bytes write `serial` (issued to `thin`) puts at sector `sector` of that thin.
fn fill_sector(serial: u64, thin: u32, sector: u64, out: &mut [u8]) {
    out[0..8].copy_from_slice(&TAG_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&serial.to_le_bytes());
    out[16..20].copy_from_slice(&thin.to_le_bytes());
    out[20..28].copy_from_slice(&sector.to_le_bytes());
    let mut x = serial
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(sector.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(u64::from(thin))
        | 1;
    for chunk in out[28..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// What a sector read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Zero,
    /// A well-formed sector of write `serial` to `thin`, meant for `sector`.
    Tag {
        serial: u64,
        thin: u32,
        sector: u64,
    },
    /// Anything else (a mix of writes, or bytes no write produced).
    Garbage,
}

fn parse_sector(bytes: &[u8]) -> Seen {
    if bytes.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&bytes[r]);
        u64::from_le_bytes(b)
    };
    if word(0..8) != TAG_MAGIC {
        return Seen::Garbage;
    }
    let (serial, thin, sector) = (word(8..16), word(16..20) as u32, word(20..28));
    let mut expect = [0u8; SECTOR];
    fill_sector(serial, thin, sector, &mut expect);
    if expect[..] != bytes[..] {
        return Seen::Garbage;
    }
    Seen::Tag {
        serial,
        thin,
        sector,
    }
}

// ---------------------------------------------------------------------------------------
// The logical clock and crash captures

/// Ticks at every request's issue and completion, and around every crash image.
#[derive(Debug, Default)]
struct Clock(AtomicU64);

impl Clock {
    fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// Both devices' crash images from one instant, bracketed by two clock ticks.
struct Capture {
    meta: MemMetaDevice,
    data: MemDataDevice,
    cut_start: u64,
    cut_end: u64,
    what: String,
}

fn crash_config(seed: u64) -> CrashConfig {
    let mut rng = SmallRng::seed_from_u64(seed);
    CrashConfig {
        keep_probability: [0.1, 0.5, 0.9][rng.gen_range(0..3)],
        tear_probability: [0.25, 0.75][rng.gen_range(0..2)],
    }
}

struct TapState {
    /// Metadata writes and flushes so far.
    nr_ops: u64,
    /// Capture just before this metadata operation (0: never).
    capture_at: u64,
    /// Mean distance between tap captures (0: the tap never captures).
    spacing: u64,
    rng: SmallRng,
    crash_seed: u64,
    captures: Vec<Capture>,
}

/// Forwards to a `FaultyMetaDevice`; every write and flush runs under its lock, so that a
/// capture (also under it) sees no metadata operation half done.
struct Tap {
    meta: Arc<FaultyMetaDevice>,
    data: Arc<FaultyDataDevice>,
    clock: Arc<Clock>,
    st: Mutex<TapState>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("meta", &self.meta).finish()
    }
}

impl Tap {
    /// A tap that captures nothing until `start_capturing` (formatting is no crash point:
    /// before its first commit there is no pool to reopen).
    fn new(
        meta: FaultyMetaDevice,
        data: Arc<FaultyDataDevice>,
        clock: Arc<Clock>,
        seed: u64,
    ) -> Arc<Tap> {
        Arc::new(Tap {
            meta: Arc::new(meta),
            data,
            clock,
            st: Mutex::new(TapState {
                nr_ops: 0,
                capture_at: 0,
                spacing: 0,
                rng: SmallRng::seed_from_u64(seed),
                crash_seed: seed << 24,
                captures: Vec::new(),
            }),
        })
    }

    /// A panic while locked fails the test anyway; poisoning carries no news.
    fn lock(&self) -> MutexGuard<'_, TapState> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes both crash images now (the caller holds the lock).
    fn capture(&self, st: &mut TapState, what: String) {
        st.crash_seed += 1;
        let seed = st.crash_seed;
        let cut_start = self.clock.tick();
        let meta = self.meta.crash_image_with(seed, crash_config(seed));
        let data = self.data.crash_image_with(!seed, crash_config(!seed));
        let cut_end = self.clock.tick();
        st.captures.push(Capture {
            meta,
            data,
            cut_start,
            cut_end,
            what,
        });
    }

    /// A capture from the test thread (between or inside batches).
    fn capture_now(&self, what: &str) {
        let mut st = self.lock();
        self.capture(&mut st, what.to_string());
    }

    fn stop_capturing(&self) {
        self.lock().spacing = 0;
    }

    /// Captures before one metadata write or flush in about every `spacing` from now on.
    fn start_capturing(&self, spacing: u64) {
        let mut st = self.lock();
        st.spacing = spacing;
        st.capture_at = st.nr_ops + st.rng.gen_range(1..=2 * spacing);
    }

    /// Counts a metadata write or flush, capturing first if it is the chosen one.
    fn before_op(&self, st: &mut TapState, what: impl FnOnce() -> String) {
        st.nr_ops += 1;
        if st.spacing == 0 || st.nr_ops != st.capture_at {
            return;
        }
        let spacing = st.spacing;
        st.capture_at = st.nr_ops + st.rng.gen_range(1..=2 * spacing);
        let what = format!("inside a commit, before {} (meta op {})", what(), st.nr_ops);
        self.capture(st, what);
    }
}

impl MetaDevice for Tap {
    fn nr_blocks(&self) -> u64 {
        self.meta.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        self.meta.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        let mut st = self.lock();
        self.before_op(&mut st, || format!("the write of metadata block {block}"));
        self.meta.write_block(block, buf)
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.lock();
        self.before_op(&mut st, || "a metadata flush".into());
        self.meta.flush()
    }
}

// ---------------------------------------------------------------------------------------
// The model

/// One version of a sector's content.
#[derive(Clone, Copy, Debug)]
struct Version {
    /// The write's serial; 0 for zeros.
    serial: u64,
    issued: u64,
    /// Completion tick of a request that succeeded.
    acked: Option<u64>,
    /// A FUA write: durable on its own once acknowledged.
    fua: bool,
}

#[derive(Clone, Debug)]
struct ThinModel {
    /// The thin this one is a snapshot of (for failure reports).
    origin: Option<u32>,
    created: u64,
    deleted: bool,
    /// Each sector's versions in order (each issued after the previous one completed). The
    /// first is the oldest one a crash may still show.
    sectors: Vec<Vec<Version>>,
    /// Successful flushes (issue, completion), including the origin's before a snapshot.
    flushes: Vec<(u64, u64)>,
    /// Every write serial this thin's lineage saw.
    visible: HashSet<u64>,
}

impl ThinModel {
    fn new(created: u64, nr_sectors: usize) -> ThinModel {
        let zero = Version {
            serial: 0,
            issued: 0,
            acked: Some(0),
            fua: false,
        };
        ThinModel {
            origin: None,
            created,
            deleted: false,
            sectors: vec![vec![zero]; nr_sectors],
            flushes: Vec::new(),
            visible: HashSet::new(),
        }
    }

    /// Issue tick of the latest flush completed before `cut` (0 if none).
    fn flushed_through(&self, cut: u64) -> u64 {
        self.flushes
            .iter()
            .filter(|&&(_, ack)| ack < cut)
            .map(|&(start, _)| start)
            .max()
            .unwrap_or(0)
    }

    /// A completed flush issued after the thin was created covers its existence.
    fn must_exist(&self, cut: u64) -> bool {
        self.flushes
            .iter()
            .any(|&(start, ack)| start > self.created && ack < cut)
    }

    /// Index of the oldest version a crash at `cut` may show for `sector`.
    fn floor(&self, sector: usize, cut: u64, flushed_through: u64) -> usize {
        let vs = &self.sectors[sector];
        (0..vs.len())
            .rev()
            .find(|&i| {
                vs[i].acked.is_some_and(|a| {
                    (a < flushed_through && vs[i].issued < flushed_through)
                        || (vs[i].fua && a < cut)
                })
            })
            .unwrap_or(0)
    }

    /// Drops versions no future crash may show (every future cut is after `now`).
    fn prune(&mut self, now: u64) {
        let through = self.flushed_through(now);
        for s in 0..self.sectors.len() {
            let f = self.floor(s, now, through);
            self.sectors[s].drain(..f);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Judging crash points

#[derive(Debug, Default)]
struct Totals {
    points: u64,
    inconsistent: u64,
    lost_flushed: u64,
    foreign_reads: u64,
    nonzero_unprovisioned: u64,
    inside_commit: u64,
    inside_batch: u64,
    between_batches: u64,
    restarts: u64,
    thin_check_runs: u64,
    sectors_checked: u64,
    sectors_unflushed_shown: u64,
    batches: u64,
}

impl Totals {
    fn failures(&self) -> u64 {
        self.inconsistent + self.lost_flushed + self.foreign_reads + self.nonzero_unprovisioned
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Inconsistent,
    LostFlushed,
    ForeignRead,
    NonzeroUnprovisioned,
}

/// What a clean crash point showed, for carrying on from it.
struct Shown {
    meta: Arc<FaultyMetaDevice>,
    data: Arc<FaultyDataDevice>,
    /// Each thin present, with each sector's serial (0: zeros).
    thins: BTreeMap<u32, Vec<u64>>,
}

struct Judge<'a> {
    checks: Option<ThinCheckQueue<'a>>,
    check_every: u64,
    dir: ScratchDir,
    seed: u64,
    /// (point, kind) already counted.
    counted: HashSet<(u64, Kind)>,
}

impl Judge<'_> {
    fn fail(&mut self, t: &mut Totals, point: u64, kind: Kind, what: &str, why: &str) {
        if !self.counted.insert((point, kind)) {
            return;
        }
        let c = match kind {
            Kind::Inconsistent => &mut t.inconsistent,
            Kind::LostFlushed => &mut t.lost_flushed,
            Kind::ForeignRead => &mut t.foreign_reads,
            Kind::NonzeroUnprovisioned => &mut t.nonzero_unprovisioned,
        };
        *c += 1;
        if t.failures() <= MAX_REPORTED {
            println!(
                "CRASH-FAIL {kind:?} seed={} point={point} ({what}): {why}",
                self.seed
            );
        }
    }

    fn start_thin_check(&mut self, t: &mut Totals, point: u64, image: &MemMetaDevice, what: &str) {
        if !point.is_multiple_of(self.check_every) {
            return;
        }
        let Some(checks) = &mut self.checks else {
            return;
        };
        let file = self.dir.join(&format!("point-{point}.bin"));
        let done = checks.start(point, image, file, what);
        self.count_checks(t, done);
    }

    fn finish(&mut self, t: &mut Totals) {
        if let Some(checks) = &mut self.checks {
            let done = checks.finish();
            self.count_checks(t, done);
        }
    }

    fn count_checks(&mut self, t: &mut Totals, done: Vec<CheckOutcome>) {
        for c in done {
            t.thin_check_runs += 1;
            if let Some(why) = c.rejected {
                self.fail(t, c.point, Kind::Inconsistent, &c.what, &why);
            }
        }
    }

    /// Judges one crash point; returns what it showed when it is clean.
    fn judge(
        &mut self,
        t: &mut Totals,
        c: &Capture,
        model: &BTreeMap<u32, ThinModel>,
        cfg: &PoolConfig,
    ) -> Option<Shown> {
        t.points += 1;
        let point = t.points;
        let what = c.what.as_str();
        let failures_before = self.counted.len();
        self.start_thin_check(t, point, &c.meta, what);
        let problems = our_check(&c.meta);
        if !problems.is_empty() {
            let why = format!("our check of the crash image: {problems:?}");
            self.fail(t, point, Kind::Inconsistent, what, &why);
            return None;
        }
        let meta = Arc::new(FaultyMetaDevice::from_image(&c.meta));
        let data = Arc::new(FaultyDataDevice::from_image(&c.data));
        let dev = data.clone();
        let pool = match Pool::open(meta.clone(), cfg.clone(), move || Ok(dev.clone())) {
            Ok(p) => p,
            Err(e) => {
                let why = format!("reopening failed: {e}");
                self.fail(t, point, Kind::Inconsistent, what, &why);
                return None;
            }
        };
        let present: HashSet<u32> = pool.thins().into_iter().collect();
        for id in &present {
            match model.get(id) {
                None => {
                    let why = format!("thin {id} exists, but was never created");
                    self.fail(t, point, Kind::Inconsistent, what, &why);
                }
                Some(m) if m.created > c.cut_end => {
                    let why = format!("thin {id} exists, but was created after the crash");
                    self.fail(t, point, Kind::Inconsistent, what, &why);
                }
                Some(_) => {}
            }
        }
        let mut shown = BTreeMap::new();
        for (&id, m) in model {
            if !present.contains(&id) {
                if !m.deleted && m.must_exist(c.cut_start) {
                    let why = format!("thin {id} is gone, though a completed flush covered it");
                    self.fail(t, point, Kind::LostFlushed, what, &why);
                }
                continue;
            }
            if m.created > c.cut_end {
                continue;
            }
            let serials = self.read_thin(t, &pool, &data, id, m, c, point);
            shown.insert(id, serials);
        }
        // Let recovery run (reserve re-zeroing, freeing deleted thins), close, check again.
        pool.wait_idle();
        if let Err(e) = pool.close() {
            let why = format!("closing the reopened pool failed: {e}");
            self.fail(t, point, Kind::Inconsistent, what, &why);
        }
        let problems = our_check(&*meta);
        if !problems.is_empty() {
            let why = format!("our check after recovery and close: {problems:?}");
            self.fail(t, point, Kind::Inconsistent, what, &why);
        }
        (self.counted.len() == failures_before).then_some(Shown {
            meta,
            data,
            thins: shown,
        })
    }

    /// Reads a whole thin of the reopened pool and compares each sector with the model.
    #[allow(clippy::too_many_arguments)]
    fn read_thin(
        &mut self,
        t: &mut Totals,
        pool: &Pool,
        data: &Arc<FaultyDataDevice>,
        id: u32,
        m: &ThinModel,
        c: &Capture,
        point: u64,
    ) -> Vec<u64> {
        let what = c.what.as_str();
        let nr_sectors = m.sectors.len();
        let thin = match pool.open_thin(id) {
            Ok(h) => h,
            Err(e) => {
                let why = format!("opening thin {id} failed: {e}");
                self.fail(t, point, Kind::Inconsistent, what, &why);
                return vec![0; nr_sectors];
            }
        };
        let (r, buf) = rt::block_on(thin.read(data, 0, IoBuf::new(nr_sectors * SECTOR)));
        if let Err(e) = r {
            let why = format!("reading thin {id} failed: {e}");
            self.fail(t, point, Kind::Inconsistent, what, &why);
            return vec![0; nr_sectors];
        }
        let through = m.flushed_through(c.cut_start);
        let mut serials = Vec::with_capacity(nr_sectors);
        for s in 0..nr_sectors {
            t.sectors_checked += 1;
            let seen = parse_sector(&buf[s * SECTOR..(s + 1) * SECTOR]);
            let floor = m.floor(s, c.cut_start, through);
            let allowed: Vec<u64> = m.sectors[s][floor..]
                .iter()
                .filter(|v| v.issued < c.cut_end)
                .map(|v| v.serial)
                .collect();
            let serial = match seen {
                Seen::Zero => Some(0),
                Seen::Tag { serial, sector, .. } if sector == s as u64 => Some(serial),
                _ => None,
            };
            if let Some(x) = serial.filter(|x| allowed.contains(x)) {
                if allowed.first() != Some(&x) {
                    t.sectors_unflushed_shown += 1;
                }
                serials.push(x);
                continue;
            }
            serials.push(serial.unwrap_or(0));
            let kind = match seen {
                Seen::Tag { serial, .. } if !m.visible.contains(&serial) => Kind::ForeignRead,
                Seen::Zero => Kind::LostFlushed,
                _ if allowed.iter().all(|&x| x == 0) => Kind::NonzeroUnprovisioned,
                _ => Kind::LostFlushed,
            };
            let history: Vec<String> = m.sectors[s]
                .iter()
                .map(|v| {
                    format!(
                        "{}@{}/{:?}{}",
                        v.serial,
                        v.issued,
                        v.acked,
                        ["", "F"][v.fua as usize]
                    )
                })
                .collect();
            let vblock = s as u64 * SECTOR as u64 / thin.block_size_bytes();
            let why = format!(
                "thin {id} (snapshot of {:?}) sector {s} (vblock {vblock}) reads {seen:?}; \
                 allowed {allowed:?} (history {history:?}, flushed through {through}, cut \
                 {}..{}); image: {}",
                m.origin,
                c.cut_start,
                c.cut_end,
                describe_image(&c.meta, id, vblock)
            );
            self.fail(t, point, kind, what, &why);
        }
        serials
    }
}

/// Who maps the data block that `thin`'s `vblock` maps to in a metadata image.
fn describe_image(image: &MemMetaDevice, thin: u32, vblock: u64) -> String {
    let dev: Arc<dyn MetaDevice> = Arc::new(MemMetaDevice::from_bytes(&image.to_bytes()));
    let md = match ThinMetadata::open(dev) {
        Ok(md) => md,
        Err(e) => return format!("does not open: {e}"),
    };
    let found = md.lookup(ThinId(thin), VBlock(vblock));
    let Ok(Lookup::Provisioned { data_block, shared }) = found else {
        return format!("lookup {found:?}");
    };
    let mut users = Vec::new();
    for t in md.thins() {
        let _ = md.for_each_mapping(t, VBlock(0), |v, d, _| {
            if d == data_block {
                users.push(format!("{}:{}", t.0, v.0));
            }
            true
        });
    }
    format!(
        "maps data block {} (shared {shared}, count {}), mapped by {users:?}",
        data_block.0,
        md.data_block_count(data_block)
    )
}

// ---------------------------------------------------------------------------------------
// The workload

/// One request of a batch.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write {
        sector: usize,
        len: usize,
        zeros: bool,
        fua: bool,
    },
    Read {
        sector: usize,
        len: usize,
    },
    Discard {
        sector: usize,
        len: usize,
    },
    WriteZeroes {
        sector: usize,
        len: usize,
    },
    Flush,
    /// A crash capture from inside the batch, after this many yields.
    Crash(u32),
}

impl Op {
    fn range(&self) -> Option<(usize, usize)> {
        match *self {
            Op::Write { sector, len, .. }
            | Op::Discard { sector, len }
            | Op::WriteZeroes { sector, len } => Some((sector, sector + len)),
            _ => None,
        }
    }
}

struct Run<'a> {
    rng: SmallRng,
    clock: Arc<Clock>,
    cfg: PoolConfig,
    block_sectors: usize,
    nr_sectors: usize,
    tap_spacing: u64,
    tap: Arc<Tap>,
    data: Arc<FaultyDataDevice>,
    pool: Option<Pool>,
    handles: BTreeMap<u32, Thin>,
    model: BTreeMap<u32, ThinModel>,
    next_id: u32,
    next_serial: u64,
    judge: Judge<'a>,
}

impl Run<'_> {
    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("the run always has a pool")
    }

    fn random_range(&mut self) -> (usize, usize) {
        let bs = self.block_sectors;
        let n = self.nr_sectors;
        let (start, len) = match self.rng.gen_range(0..4) {
            // Inside one block.
            0 => (self.rng.gen_range(0..n), self.rng.gen_range(1..=bs.min(8))),
            // Whole blocks.
            1 => (
                self.rng.gen_range(0..n / bs) * bs,
                bs * self.rng.gen_range(1..=3),
            ),
            // Anywhere, up to three blocks.
            _ => (self.rng.gen_range(0..n), self.rng.gen_range(1..=3 * bs)),
        };
        (start, len.min(n - start))
    }

    fn random_op(&mut self) -> Op {
        let p = self.rng.gen_range(0..100);
        let (sector, len) = self.random_range();
        match p {
            0..=49 => Op::Write {
                sector,
                len,
                zeros: self.rng.gen_bool(0.05),
                fua: self.rng.gen_bool(0.15),
            },
            50..=59 => Op::Read { sector, len },
            60..=71 => Op::Discard { sector, len },
            72..=79 => Op::WriteZeroes { sector, len },
            _ => Op::Flush,
        }
    }

    /// A batch of concurrent requests on open thins; mutations within a batch touch disjoint
    /// sectors of each thin, so that each sector's versions stay totally ordered.
    fn batch(&mut self, totals: &mut Totals) {
        totals.batches += 1;
        let ids: Vec<u32> = self.handles.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let mut ops: Vec<(u32, Op)> = Vec::new();
        let mut busy: HashMap<u32, Vec<(usize, usize)>> = HashMap::new();
        for _ in 0..self.rng.gen_range(1..=8) {
            let id = ids[self.rng.gen_range(0..ids.len())];
            let op = self.random_op();
            if let Some((a, b)) = op.range() {
                let taken = busy.entry(id).or_default();
                if taken.iter().any(|&(x, y)| a < y && x < b) {
                    continue;
                }
                taken.push((a, b));
            }
            ops.push((id, op));
        }
        if self.rng.gen_bool(0.25) {
            ops.push((0, Op::Crash(self.rng.gen_range(0..6))));
        }
        let serials: Vec<u64> = ops
            .iter()
            .map(|(_, op)| match op {
                Op::Write { zeros: false, .. } => {
                    self.next_serial += 1;
                    self.next_serial
                }
                _ => 0,
            })
            .collect();
        for (&(id, _), &serial) in ops.iter().zip(&serials) {
            if let (true, Some(m)) = (serial != 0, self.model.get_mut(&id)) {
                m.visible.insert(serial);
            }
        }
        let sector_bytes = SECTOR as u64;
        let (clock, tap, data, handles) = (&*self.clock, &*self.tap, &self.data, &self.handles);
        let outcomes = rt::block_on(rt::join_all(ops.iter().zip(&serials).map(
            |(&(id, op), &serial)| async move {
                let issued = clock.tick();
                let ok = match op {
                    Op::Crash(yields) => {
                        for _ in 0..yields {
                            rt::yield_now().await;
                        }
                        tap.capture_now("inside a batch of requests");
                        true
                    }
                    Op::Write {
                        sector,
                        len,
                        zeros,
                        fua,
                    } => {
                        let mut buf = IoBuf::new(len * SECTOR);
                        if !zeros {
                            for (i, chunk) in buf.chunks_mut(SECTOR).enumerate() {
                                fill_sector(serial, id, (sector + i) as u64, chunk);
                            }
                        }
                        let off = sector as u64 * sector_bytes;
                        handles[&id].write(data, off, buf, fua).await.0.is_ok()
                    }
                    Op::Read { sector, len } => {
                        let off = sector as u64 * sector_bytes;
                        let buf = IoBuf::new(len * SECTOR);
                        handles[&id].read(data, off, buf).await.0.is_ok()
                    }
                    Op::Discard { sector, len } => {
                        let (off, n) = (sector as u64 * sector_bytes, len as u64 * sector_bytes);
                        handles[&id].discard(data, off, n).await.is_ok()
                    }
                    Op::WriteZeroes { sector, len } => {
                        let (off, n) = (sector as u64 * sector_bytes, len as u64 * sector_bytes);
                        handles[&id].write_zeroes(data, off, n).await.is_ok()
                    }
                    Op::Flush => handles[&id].flush(data).await.is_ok(),
                };
                (issued, ok.then(|| clock.tick()))
            },
        )));
        let bs = self.block_sectors;
        for ((&(id, op), &serial), &(issued, acked)) in ops.iter().zip(&serials).zip(&outcomes) {
            let Some(m) = self.model.get_mut(&id) else {
                continue;
            };
            let mut put = |range: std::ops::Range<usize>, serial: u64, fua: bool| {
                for s in range {
                    m.sectors[s].push(Version {
                        serial,
                        issued,
                        acked,
                        fua,
                    });
                }
            };
            match op {
                Op::Write {
                    sector, len, fua, ..
                } => put(sector..sector + len, serial, fua),
                Op::WriteZeroes { sector, len } => put(sector..sector + len, 0, false),
                Op::Discard { sector, len } => {
                    // Only whole blocks are unmapped; partial ones are left alone.
                    let first = sector.div_ceil(bs) * bs;
                    let end = (sector + len) / bs * bs;
                    if first < end {
                        put(first..end, 0, false);
                    }
                }
                Op::Flush => {
                    if let Some(a) = acked {
                        m.flushes.push((issued, a));
                    }
                }
                Op::Read { .. } | Op::Crash(_) => {}
            }
        }
    }

    /// A snapshot, create or delete between batches.
    fn control(&mut self) {
        let live: Vec<u32> = self.handles.keys().copied().collect();
        match self.rng.gen_range(0..3) {
            0 if live.len() < MAX_LIVE_THINS => self.create(None),
            1 if live.len() < MAX_LIVE_THINS && !live.is_empty() => {
                let origin = live[self.rng.gen_range(0..live.len())];
                self.create(Some(origin));
            }
            2 if live.len() > 1 => {
                let id = live[self.rng.gen_range(0..live.len())];
                self.handles.remove(&id);
                self.pool()
                    .delete_thin(id)
                    .unwrap_or_else(|e| panic!("deleting thin {id}: {e}"));
                self.clock.tick();
                if let Some(m) = self.model.get_mut(&id) {
                    m.deleted = true;
                }
            }
            _ => {}
        }
    }

    fn create(&mut self, origin: Option<u32>) {
        let id = self.next_id;
        self.next_id += 1;
        let created = self.clock.tick();
        let m = match origin {
            None => {
                self.pool()
                    .create_thin(id)
                    .unwrap_or_else(|e| panic!("creating thin {id}: {e}"));
                ThinModel::new(created, self.nr_sectors)
            }
            Some(o) => {
                rt::block_on(self.pool().create_snap(id, o))
                    .unwrap_or_else(|e| panic!("snapshot {id} of {o}: {e}"));
                let mut m = self.model[&o].clone();
                m.created = created;
                m.origin = Some(o);
                m
            }
        };
        self.clock.tick();
        self.model.insert(id, m);
        let h = self
            .pool()
            .open_thin(id)
            .unwrap_or_else(|e| panic!("opening thin {id}: {e}"));
        self.handles.insert(id, h);
    }

    /// Judges every capture taken so far, then prunes the model. Maybe restarts from one.
    fn judge_captures(&mut self, totals: &mut Totals) {
        let (captures, now) = {
            let mut st = self.tap.lock();
            (std::mem::take(&mut st.captures), self.clock.tick())
        };
        let mut restart = None;
        for c in &captures {
            if c.what.starts_with("inside a commit") {
                totals.inside_commit += 1;
            } else if c.what.starts_with("inside a batch") {
                totals.inside_batch += 1;
            } else {
                totals.between_batches += 1;
            }
            let shown = self.judge.judge(totals, c, &self.model, &self.cfg);
            if restart.is_none() && self.rng.gen_bool(0.03) {
                restart = shown;
            }
        }
        for m in self.model.values_mut() {
            m.prune(now);
        }
        if let Some(shown) = restart {
            totals.restarts += 1;
            self.restart(shown);
        }
    }

    /// Carries on from a judged crash image: its thins, with what they showed, are durable.
    fn restart(&mut self, shown: Shown) {
        self.handles.clear();
        self.tap.stop_capturing();
        drop(self.pool.take());
        self.data = shown.data;
        let meta = Arc::try_unwrap(shown.meta)
            .unwrap_or_else(|m| FaultyMetaDevice::from_image(&m.durable_image()));
        self.tap = Tap::new(meta, self.data.clone(), self.clock.clone(), self.rng.gen());
        let dev = self.data.clone();
        self.pool = Some(
            Pool::open(self.tap.clone(), self.cfg.clone(), move || Ok(dev.clone()))
                .unwrap_or_else(|e| panic!("reopening a judged crash image: {e}")),
        );
        self.tap.start_capturing(self.tap_spacing);
        let mut model = BTreeMap::new();
        for (id, serials) in shown.thins {
            let created = self.clock.tick();
            let flush = self.clock.tick();
            let mut m = ThinModel::new(created, self.nr_sectors);
            for (s, &serial) in serials.iter().enumerate() {
                m.sectors[s][0].serial = serial;
            }
            m.flushes.push((flush, flush));
            m.visible = self
                .model
                .get(&id)
                .map(|o| o.visible.clone())
                .unwrap_or_default();
            let h = self
                .pool()
                .open_thin(id)
                .unwrap_or_else(|e| panic!("opening thin {id} after a restart: {e}"));
            self.handles.insert(id, h);
            model.insert(id, m);
        }
        self.model = model;
        while self.handles.len() > MAX_LIVE_THINS {
            let (&id, _) = self.handles.iter().next().expect("not empty");
            self.handles.remove(&id);
            self.pool()
                .delete_thin(id)
                .unwrap_or_else(|e| panic!("deleting thin {id}: {e}"));
            if let Some(m) = self.model.get_mut(&id) {
                m.deleted = true;
            }
        }
        if self.handles.is_empty() {
            self.create(None);
        }
    }
}

fn run_seed(seed: u64, nr_points: u64, tools: Option<&Tools>, check_every: u64, t: &mut Totals) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x706f_6f6c);
    let block_size: u64 = [4096, 8192, 16384, 65536][rng.gen_range(0..4)];
    let nr_data_blocks: u64 = rng.gen_range(64..=160);
    let vblocks: u64 = rng.gen_range(16..=40);
    let block_sectors = (block_size / SECTOR as u64) as usize;
    let cfg = PoolConfig {
        reserve_blocks: [0, 2, 6][rng.gen_range(0..3)],
        reserve_refill_batch: rng.gen_range(1..=4),
        reserve_busy_pause: Duration::from_micros(200),
        no_space: NoSpacePolicy::Error,
        commit_interval: if rng.gen_bool(0.5) {
            Duration::from_millis(rng.gen_range(2..20))
        } else {
            Duration::from_secs(3600)
        },
        discard_passdown: rng.gen_bool(0.7),
        discard_batch_blocks: rng.gen_range(1..=4),
        delete_batch_blocks: rng.gen_range(1..=8),
        ..PoolConfig::default()
    };
    let geometry = DataGeometry::new(block_size, nr_data_blocks, SECTOR as u64)
        .unwrap_or_else(|e| panic!("geometry: {e}"));
    let data = Arc::new(FaultyDataDevice::new(geometry));
    if rng.gen_bool(0.5) {
        // Slow data flushes widen the window in which commits and requests overlap.
        data.set_latency(DataOp::Flush, Duration::from_micros(rng.gen_range(50..400)));
    }
    let clock = Arc::new(Clock::default());
    let tap_spacing = rng.gen_range(5..40);
    let tap = Tap::new(
        FaultyMetaDevice::new(NR_META_BLOCKS),
        data.clone(),
        clock.clone(),
        rng.gen(),
    );
    let dev = data.clone();
    let pool = Pool::format(tap.clone(), nr_data_blocks, cfg.clone(), move || {
        Ok(dev.clone())
    })
    .unwrap_or_else(|e| panic!("formatting the pool: {e}"));
    tap.start_capturing(tap_spacing);
    println!(
        "POOL-CRASH seed={seed} block_size={block_size} data_blocks={nr_data_blocks} \
         thin_blocks={vblocks} {cfg:?}"
    );
    let mut run = Run {
        rng,
        clock,
        cfg,
        block_sectors,
        nr_sectors: vblocks as usize * block_sectors,
        tap_spacing,
        tap,
        data,
        pool: Some(pool),
        handles: BTreeMap::new(),
        model: BTreeMap::new(),
        next_id: 1,
        next_serial: 0,
        judge: Judge {
            checks: tools.map(|t| ThinCheckQueue::new(t, MAX_CHECKS_IN_FLIGHT)),
            check_every,
            dir: ScratchDir::new("pool-crash"),
            seed,
            counted: HashSet::new(),
        },
    };
    run.create(None);
    let end = t.points + nr_points;
    while t.points < end {
        if run.rng.gen_bool(0.12) {
            run.control();
        }
        run.batch(t);
        if run.rng.gen_bool(0.3) {
            run.tap.capture_now("between batches");
        }
        run.judge_captures(t);
    }
    run.handles.clear();
    run.tap.stop_capturing();
    drop(run.pool.take());
    run.judge.finish(t);
}

#[test]
fn pool_crashes_keep_flushed_data_and_never_leak_foreign_bytes() {
    let test = "pool_crashes_keep_flushed_data_and_never_leak_foreign_bytes";
    let tools = Tools::find(test);
    let default_points = if cfg!(debug_assertions) { 60 } else { 1000 };
    let points = env_u64("POOL_CRASH_POINTS").unwrap_or(default_points);
    let check_every = env_u64("POOL_CRASH_THIN_CHECK_EVERY").unwrap_or(1).max(1);
    let nr_seeds = if env_u64("POOL_CRASH_SEED").is_some() {
        1
    } else {
        env_u64("POOL_CRASH_SEEDS").unwrap_or(4).max(1)
    };
    let started = Instant::now();
    let mut t = Totals::default();
    for_each_seed(test, "POOL_CRASH", nr_seeds, |seed| {
        run_seed(
            seed,
            points.div_ceil(nr_seeds),
            tools.as_ref(),
            check_every,
            &mut t,
        );
    });
    println!(
        "CRASH points={} inconsistent={} lost_flushed={} foreign_reads={} \
         nonzero_unprovisioned={}",
        t.points, t.inconsistent, t.lost_flushed, t.foreign_reads, t.nonzero_unprovisioned
    );
    println!(
        "CRASH-DETAIL inside_commit={} inside_batch={} between_batches={} restarts={} \
         batches={} sectors_checked={} sectors_showing_unflushed={} \
         thin_check_runs={} (every {} point(s){}) secs={:.1}",
        t.inside_commit,
        t.inside_batch,
        t.between_batches,
        t.restarts,
        t.batches,
        t.sectors_checked,
        t.sectors_unflushed_shown,
        t.thin_check_runs,
        check_every,
        if tools.is_some() {
            ""
        } else {
            ", thin_check missing"
        },
        started.elapsed().as_secs_f64()
    );
    assert!(
        t.failures() == 0 && t.points >= points,
        "{} crash points of {points} asked for; {} inconsistent, {} lost_flushed, {} \
         foreign_reads, {} nonzero_unprovisioned (CRASH-FAIL lines above name seed and point; \
         replay a seed with POOL_CRASH_SEED=<seed> POOL_CRASH_POINTS={points})",
        t.points,
        t.inconsistent,
        t.lost_flushed,
        t.foreign_reads,
        t.nonzero_unprovisioned
    );
}
