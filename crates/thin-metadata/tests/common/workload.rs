//! The seeded random workload: one generator picks operations, runs each on `ThinMetadata`
//! and on the model, and fails with the recent operations on the first difference.

use super::state::{compare_state, compare_thin, Model, State};
use block_io::MetaDevice;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::sync::Arc;
use thin_metadata::check::{check, CheckOptions, Problem};
use thin_metadata::{
    DataBlock, Error, FormatOptions, Lookup, Space, ThinId, ThinMetadata, VBlock, MAX_THIN_ID,
};

/// Shape of a workload.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub nr_data_blocks: u64,
    /// Virtual blocks are drawn from `0..max_vblock`.
    pub max_vblock: u64,
    /// Thin ids are mostly drawn from `0..nr_thin_ids` (plus two large ones).
    pub nr_thin_ids: u32,
    /// Longest run of consecutive blocks one bulk write provisions.
    pub max_run: u64,
    /// One in this many chosen deletes and range removes happens (1: all of them), so
    /// that some workloads grow big thins.
    pub shrink_rarity: u32,
    /// Whether `step` may itself commit, abort and reopen (the crash test commits itself).
    pub commit_ops: bool,
    /// Node cache size; a small one makes lookups and changes read nodes from the device.
    pub cache_nodes: Option<usize>,
}

impl Config {
    /// Few thins with long runs and rare deletes, so that mapping trees grow a third level.
    pub fn deep(rng: &mut SmallRng) -> Self {
        Config {
            nr_data_blocks: 1 << 20,
            max_vblock: 400_000,
            nr_thin_ids: 2,
            max_run: 8000,
            shrink_rarity: 10,
            commit_ops: true,
            cache_nodes: rng.gen_bool(0.25).then_some(64),
        }
    }

    /// A varied shape: small or large virtual and data spaces, few or many thins.
    pub fn random(rng: &mut SmallRng) -> Self {
        if rng.gen_range(0..8) == 0 {
            // Big thins: long runs, few deletes.
            return Config {
                max_vblock: 200_000,
                max_run: 1000,
                nr_thin_ids: 3,
                ..Config::deep(rng)
            };
        }
        let max_vblock = [64, 600, 3000, 20_000][rng.gen_range(0..4)];
        let nr_data_blocks = match rng.gen_range(0..4) {
            // Tight: NoSpace(Data) and reuse of freed blocks are common.
            0 => rng.gen_range(50..400),
            1 => 20_000,
            // Spans several bitmaps (16320 blocks each).
            2 => 50_000,
            _ => 1 << 20,
        };
        Config {
            nr_data_blocks,
            max_vblock,
            nr_thin_ids: rng.gen_range(2..16),
            max_run: 200,
            shrink_rarity: 1,
            commit_ops: true,
            cache_nodes: rng.gen_bool(0.25).then_some(64),
        }
    }
}

/// Counts of what a workload did, for the test's summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub ops: u64,
    pub commits: u64,
    pub aborts: u64,
    pub reopens: u64,
    pub snaps: u64,
    pub writes_in_place: u64,
    pub writes_allocating: u64,
    pub no_space: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.ops += o.ops;
        self.commits += o.commits;
        self.aborts += o.aborts;
        self.reopens += o.reopens;
        self.snaps += o.snaps;
        self.writes_in_place += o.writes_in_place;
        self.writes_allocating += o.writes_allocating;
        self.no_space += o.no_space;
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ops={} commits={} aborts={} reopens={} snaps={} writes_in_place={} \
             writes_allocating={} no_space={}",
            self.ops,
            self.commits,
            self.aborts,
            self.reopens,
            self.snaps,
            self.writes_in_place,
            self.writes_allocating,
            self.no_space
        )
    }
}

/// `ThinMetadata` and the model, driven by one seeded generator.
#[derive(Debug)]
pub struct Workload {
    pub md: ThinMetadata,
    pub dev: Arc<dyn MetaDevice>,
    pub model: Model,
    pub rng: SmallRng,
    pub cfg: Config,
    pub stats: Stats,
    /// Checker problems `check_committed` lets pass (known false positives only).
    pub check_tolerates: fn(&Problem) -> bool,
    recent: VecDeque<String>,
}

/// How many recent operations a failure message lists.
const RECENT_OPS: usize = 24;

impl Workload {
    /// Formats `dev` and starts a workload on it.
    pub fn format(dev: Arc<dyn MetaDevice>, cfg: Config, seed: u64) -> Self {
        let opts = FormatOptions {
            data_block_size_sectors: 128,
            nr_data_blocks: cfg.nr_data_blocks,
        };
        let md = ThinMetadata::format(dev.clone(), opts).expect("format");
        Self::resume(dev, md, State::new(opts), cfg, seed)
    }

    /// Continues on metadata whose committed state is `st`.
    pub fn resume(
        dev: Arc<dyn MetaDevice>,
        md: ThinMetadata,
        st: State,
        cfg: Config,
        seed: u64,
    ) -> Self {
        if let Some(n) = cfg.cache_nodes {
            md.set_cache_capacity(n);
        }
        Workload {
            md,
            dev,
            model: Model::new(st),
            rng: SmallRng::seed_from_u64(seed),
            cfg,
            stats: Stats::default(),
            check_tolerates: |_| false,
            recent: VecDeque::new(),
        }
    }

    /// Panics with the operation count and the recent operations.
    #[track_caller]
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let recent: Vec<&str> = self.recent.iter().map(String::as_str).collect();
        panic!(
            "after {} operations: {msg}\nrecent operations, oldest first:\n  {}",
            self.stats.ops,
            recent.join("\n  ")
        )
    }

    fn log(&mut self, what: String) {
        if self.recent.len() == RECENT_OPS {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
    }

    #[track_caller]
    fn ok<T>(&self, what: &str, r: Result<T, Error>) -> T {
        r.unwrap_or_else(|e| self.fail(format!("{what} failed: {e}")))
    }

    fn pick_new_id(&mut self) -> u32 {
        match self.rng.gen_range(0..20) {
            0 => MAX_THIN_ID,
            1 => 1 << 20,
            _ => self.rng.gen_range(0..self.cfg.nr_thin_ids),
        }
    }

    fn pick_thin(&mut self) -> Option<u32> {
        let n = self.model.cur.thins.len();
        if n == 0 {
            return None;
        }
        let i = self.rng.gen_range(0..n);
        self.model.cur.thins.keys().nth(i).copied()
    }

    fn pick_pending(&mut self) -> Option<u64> {
        let n = self.model.pending.len();
        if n == 0 {
            return None;
        }
        let i = self.rng.gen_range(0..n);
        self.model.pending.iter().nth(i).copied()
    }

    /// Runs one random operation (never commit/abort/reopen unless `cfg.commit_ops`).
    pub fn step(&mut self) {
        self.stats.ops += 1;
        let r = self.rng.gen_range(0..1000);
        let lifecycle = self.cfg.commit_ops;
        match r {
            _ if self.model.cur.thins.is_empty() => self.create(),
            0..=24 => self.create(),
            25..=54 => self.snap(),
            55..=69 if self.rng.gen_range(0..self.cfg.shrink_rarity) == 0 => self.delete(),
            70..=599 => {
                let thin = self.pick_thin();
                let v = self.rng.gen_range(0..self.cfg.max_vblock);
                let len = if self.rng.gen_range(0..10) == 0 {
                    self.rng.gen_range(1..=self.cfg.max_run)
                } else {
                    1
                };
                if let Some(id) = thin {
                    for i in 0..len {
                        if !self.write(id, v.saturating_add(i)) {
                            break;
                        }
                    }
                }
            }
            600..=679 if self.rng.gen_range(0..self.cfg.shrink_rarity) == 0 => self.remove(),
            680..=709 => self.pending_op(),
            710..=759 => self.lookup_random(),
            760..=799 => self.verify_random_thin(),
            800..=819 => self.check_status(),
            820..=834 => self.held_op(),
            835..=849 => self.set_transaction_id(),
            850..=859 => self.grow_data(),
            860..=939 if lifecycle => self.commit(),
            940..=959 if lifecycle => self.abort(),
            960..=979 if lifecycle => self.reopen(),
            _ => self.lookup_random(),
        }
    }

    fn create(&mut self) {
        let id = self.pick_new_id();
        self.log(format!("create_thin({id})"));
        let r = self.md.create_thin(ThinId(id));
        if self.model.cur.thins.contains_key(&id) {
            if !matches!(r, Err(Error::ThinExists(x)) if x == id) {
                self.fail(format!("create_thin({id}) of an existing thin gave {r:?}"));
            }
            return;
        }
        if self.no_metadata_space(&r) {
            return;
        }
        self.ok("create_thin", r);
        self.model.create_thin(id);
    }

    fn snap(&mut self) {
        let Some(origin) = self.pick_thin() else {
            return;
        };
        let id = self.pick_new_id();
        self.log(format!("create_snap({id}, origin {origin})"));
        let r = self.md.create_snap(ThinId(id), ThinId(origin));
        if self.model.cur.thins.contains_key(&id) {
            if !matches!(r, Err(Error::ThinExists(x)) if x == id) {
                self.fail(format!(
                    "create_snap({id}) over an existing thin gave {r:?}"
                ));
            }
            return;
        }
        if self.no_metadata_space(&r) {
            return;
        }
        self.ok("create_snap", r);
        self.model.create_snap(id, origin);
        self.stats.snaps += 1;
    }

    fn delete(&mut self) {
        let id = if self.rng.gen_range(0..10) == 0 {
            self.pick_new_id()
        } else {
            match self.pick_thin() {
                Some(id) => id,
                None => return,
            }
        };
        self.log(format!("delete_thin({id})"));
        let r = self.md.delete_thin(ThinId(id));
        if !self.model.cur.thins.contains_key(&id) {
            if !matches!(r, Err(Error::UnknownThin(x)) if x == id) {
                self.fail(format!("delete_thin({id}) of a missing thin gave {r:?}"));
            }
            return;
        }
        if self.no_metadata_space(&r) {
            return;
        }
        self.ok("delete_thin", r);
        self.model.delete_thin(id);
    }

    /// Checks a lookup against the model and returns it.
    pub fn check_lookup(&self, id: u32, v: u64) -> Lookup {
        let got = self.md.lookup(ThinId(id), VBlock(v));
        match self.model.lookup(id, v) {
            None => {
                if !matches!(got, Err(Error::UnknownThin(x)) if x == id) {
                    self.fail(format!("lookup({id}, {v}) of a missing thin gave {got:?}"));
                }
                Lookup::Unprovisioned
            }
            Some(want) => {
                let got = self.ok("lookup", got);
                if got != want {
                    self.fail(format!(
                        "lookup({id}, {v}) gave {got:?}, model has {want:?}"
                    ));
                }
                got
            }
        }
    }

    /// A write as the pool does it: in place to an unshared block, else allocate and map.
    /// Returns false when the data space is full.
    fn write(&mut self, id: u32, v: u64) -> bool {
        self.log(format!("write({id}, {v})"));
        match self.check_lookup(id, v) {
            Lookup::Provisioned { shared: false, .. } => {
                self.stats.writes_in_place += 1;
                true
            }
            _ => {
                let Some(b) = self.alloc() else {
                    return false;
                };
                let r = self.md.insert(ThinId(id), VBlock(v), DataBlock(b));
                if self.no_metadata_space(&r) {
                    return false;
                }
                self.ok("insert", r);
                self.model.insert(id, v, b);
                self.stats.writes_allocating += 1;
                true
            }
        }
    }

    /// Allocates a data block, checking the outcome against the model.
    fn alloc(&mut self) -> Option<u64> {
        let r = self.md.alloc_data_block();
        let allocatable = self.model.nr_allocatable();
        match r {
            Err(Error::NoSpace(Space::Data)) if allocatable == 0 => {
                self.stats.no_space += 1;
                None
            }
            Ok(b) if allocatable > 0 => {
                if let Err(e) = self.model.alloc(b.0) {
                    self.fail(e);
                }
                Some(b.0)
            }
            r => self.fail(format!(
                "alloc_data_block gave {r:?} with {allocatable} allocatable blocks"
            )),
        }
    }

    fn remove(&mut self) {
        let Some(id) = self.pick_thin() else {
            return;
        };
        let begin = self.rng.gen_range(0..self.cfg.max_vblock);
        let single = self.rng.gen_bool(0.5);
        let end = if single {
            begin + 1
        } else {
            begin
                + self
                    .rng
                    .gen_range(1..(self.cfg.max_vblock / 4).min(5000) + 2)
        };
        let r = if single {
            self.log(format!("remove({id}, {begin})"));
            self.md.remove(ThinId(id), VBlock(begin)).map(u64::from)
        } else {
            self.log(format!("remove_range({id}, {begin}..{end})"));
            self.md.remove_range(ThinId(id), VBlock(begin), VBlock(end))
        };
        if self.no_metadata_space(&r) {
            return;
        }
        let n = self.ok("remove", r);
        let want = self.model.remove_range(id, begin, end);
        if n != want {
            self.fail(format!(
                "remove of {id} [{begin}, {end}) unmapped {n}, model {want}"
            ));
        }
    }

    fn pending_op(&mut self) {
        match self.rng.gen_range(0..3) {
            0 => {
                self.log("alloc_data_block (held)".into());
                self.alloc();
            }
            1 => {
                let Some(b) = self.pick_pending() else {
                    return;
                };
                self.log(format!("release_data_block({b})"));
                let r = self.md.release_data_block(DataBlock(b));
                self.ok("release_data_block", r);
                self.model.release(b);
            }
            _ => {
                let (Some(b), Some(id)) = (self.pick_pending(), self.pick_thin()) else {
                    return;
                };
                let v = self.rng.gen_range(0..self.cfg.max_vblock);
                self.log(format!("insert({id}, {v}, held block {b})"));
                let r = self.md.insert(ThinId(id), VBlock(v), DataBlock(b));
                if self.no_metadata_space(&r) {
                    return;
                }
                self.ok("insert", r);
                self.model.insert(id, v, b);
            }
        }
    }

    fn lookup_random(&mut self) {
        let id = if self.rng.gen_range(0..20) == 0 {
            self.pick_new_id()
        } else {
            match self.pick_thin() {
                Some(id) => id,
                None => return,
            }
        };
        let v = self.rng.gen_range(0..self.cfg.max_vblock + 10);
        self.check_lookup(id, v);
    }

    fn verify_random_thin(&mut self) {
        if let Some(id) = self.pick_thin() {
            let t = &self.model.cur.thins[&id];
            if let Err(e) = compare_thin(&self.md, id, t) {
                self.fail(e);
            }
        }
    }

    /// Status against the model, plus the reference counts of a few blocks.
    pub fn check_status(&mut self) {
        let s = self.md.status();
        let m = &self.model;
        let want = (
            m.cur.transaction_id,
            m.cur.time,
            m.cur.nr_data_blocks,
            m.nr_free(),
        );
        let got = (
            s.transaction_id,
            s.time,
            s.nr_data_blocks,
            s.nr_free_data_blocks,
        );
        if got != want || s.held_root.is_some() != m.cur.held.is_some() {
            self.fail(format!(
                "status (transaction id, time, data blocks, free) {got:?} held {:?}, model \
                 {want:?} held {}",
                s.held_root,
                m.cur.held.is_some()
            ));
        }
        for _ in 0..8 {
            let b = self.rng.gen_range(0..self.model.cur.nr_data_blocks);
            let count = self.md.data_block_count(DataBlock(b));
            if (count > 0) != self.model.in_use(b) {
                self.fail(format!(
                    "data block {b} has count {count}; model says in use: {}",
                    self.model.in_use(b)
                ));
            }
        }
    }

    /// Checks everything: every thin, status, and nothing pending beyond the model's.
    pub fn verify_all(&self) {
        let st = &self.model.cur;
        if let Err(e) = compare_state(&self.md, st, self.model.pending.len() as u64) {
            self.fail(e);
        }
    }

    fn held_op(&mut self) {
        if self.model.cur.held.is_none() || self.rng.gen_range(0..8) == 0 {
            self.log("reserve_metadata_snap".into());
            let r = self.md.reserve_metadata_snap();
            if self.model.cur.held.is_some() {
                if !matches!(r, Err(Error::InvalidArgument(_))) {
                    self.fail(format!("second reserve_metadata_snap gave {r:?}"));
                }
                return;
            }
            if self.no_metadata_space(&r) {
                return;
            }
            self.ok("reserve_metadata_snap", r);
            self.model.reserve_held();
        } else {
            self.log("release_metadata_snap".into());
            let r = self.md.release_metadata_snap();
            if self.no_metadata_space(&r) {
                return;
            }
            self.ok("release_metadata_snap", r);
            self.model.release_held();
        }
    }

    fn set_transaction_id(&mut self) {
        let cur = self.model.cur.transaction_id;
        let stale = self.rng.gen_range(0..5) == 0;
        let asked = if stale {
            cur + 1 + self.rng.gen_range(0..3)
        } else {
            cur
        };
        let new = cur + self.rng.gen_range(1..4);
        self.log(format!("set_transaction_id({asked}, {new})"));
        let r = self.md.set_transaction_id(asked, new);
        if stale {
            let ok = matches!(r, Err(Error::TransactionIdMismatch { expected, actual })
                if expected == asked && actual == cur);
            if !ok {
                self.fail(format!("stale set_transaction_id gave {r:?}"));
            }
        } else {
            self.ok("set_transaction_id", r);
            self.model.cur.transaction_id = new;
        }
    }

    fn grow_data(&mut self) {
        let cur = self.model.cur.nr_data_blocks;
        if self.rng.gen_range(0..5) == 0 {
            self.log(format!("grow_data({}) (shrink)", cur - 1));
            let r = self.md.grow_data(cur - 1);
            if !matches!(r, Err(Error::InvalidArgument(_))) {
                self.fail(format!("shrinking the data space gave {r:?}"));
            }
            return;
        }
        let new = cur + self.rng.gen_range(0..cur.min(20_000) + 1);
        self.log(format!("grow_data({new})"));
        let r = self.md.grow_data(new);
        self.ok("grow_data", r);
        self.model.cur.nr_data_blocks = new;
    }

    /// Gives back every allocated block not yet inserted, as the pool does when in-flight
    /// provisioning fails; commits happen only without any.
    pub fn release_pending(&mut self) {
        while let Some(b) = self.model.pending.first().copied() {
            let r = self.md.release_data_block(DataBlock(b));
            self.ok("release_data_block", r);
            self.model.release(b);
        }
    }

    pub fn commit(&mut self) {
        self.release_pending();
        self.log("commit".into());
        let r = self.md.commit();
        self.ok("commit", r);
        self.model.commit();
        self.stats.commits += 1;
        self.check_status();
    }

    pub fn abort(&mut self) {
        self.log("abort".into());
        let r = self.md.abort();
        self.ok("abort", r);
        self.model.revert();
        self.stats.aborts += 1;
        self.check_status();
    }

    /// Opens the device afresh, sometimes after a commit, and checks everything.
    pub fn reopen(&mut self) {
        if self.rng.gen_bool(0.5) {
            self.commit();
        }
        self.log("reopen".into());
        let md = ThinMetadata::open(self.dev.clone());
        self.md = self.ok("open", md);
        if let Some(n) = self.cfg.cache_nodes {
            self.md.set_cache_capacity(n);
        }
        self.model.revert();
        self.stats.reopens += 1;
        self.verify_all();
        self.check_committed();
    }

    /// Runs the offline checker on the device, which holds the last commit: it must be
    /// clean and count what the model does.
    pub fn check_committed(&self) {
        let report = check(&*self.dev, &CheckOptions::default());
        let tolerated = report.problems.iter().all(|p| (self.check_tolerates)(p));
        if report.nr_problems_omitted > 0 || !tolerated {
            self.fail(format!(
                "the checker finds problems in committed metadata:\n{report}"
            ));
        }
        let st = &self.model.committed;
        let got = (
            report.nr_thins,
            report.nr_data_blocks_used,
            report.transaction_id,
        );
        let want = (
            st.thins.len() as u64,
            st.blocks_in_use().len() as u64,
            st.transaction_id,
        );
        if got != want {
            self.fail(format!(
                "the checker counts (thins, data blocks used, transaction id) {got:?}, model \
                 {want:?}"
            ));
        }
    }

    /// Ran out of metadata space: the pool would abort the transaction and go read-only
    /// until the metadata is grown; the workload aborts and carries on.
    fn no_metadata_space<T>(&mut self, r: &Result<T, Error>) -> bool {
        if !matches!(r, Err(Error::NoSpace(Space::Metadata))) {
            return false;
        }
        self.log("(no metadata space: abort)".into());
        self.stats.no_space += 1;
        let r = self.md.abort();
        self.ok("abort", r);
        self.model.revert();
        true
    }
}
