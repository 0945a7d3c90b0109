//! A naive reference model of dm-thin metadata and a seeded random workload that drives
//! `ThinMetadata` and the model in lockstep, comparing every answer.
//!
//! Shared by the model and corruption tests here and, through a `#[path]` include, by the
//! oracle and crash tests of the `tests` package, so that every test checks against the
//! same model.
//!
//! The model never looks at trees or reference counts. Each thin is a map of virtual block
//! -> (data block, time). A data block is in use while a thin, the held metadata snapshot
//! or an allocation not yet inserted names it, and shared while more than one of those
//! does. Data block identity stands in for data contents: the model records which block the
//! metadata handed out, so a wrong `shared` flag (which would let the pool overwrite a block
//! another thin still reads) shows up as a mismatch at the lookup itself.
//!
//! What must NOT happen, and is asserted on every operation:
//! - a lookup, walk or `details` that differs from the model;
//! - a `shared` flag that is not exact, in either direction;
//! - an allocation of a block that is in use, or that the last committed state still names
//!   (a crash would then find the committed mapping pointing at overwritten data);
//! - `NoSpace(Data)` while an allocatable block exists, or success when none does;
//! - free counts, transaction id or time that differ from the model;
//! - `abort` or a reopen that yields anything but the last committed state.

pub mod blocks;

use block_io::MetaDevice;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use thin_metadata::check::{check, CheckOptions, Problem};
use thin_metadata::{
    DataBlock, DeviceDetails, Error, FormatOptions, Lookup, Space, ThinId, ThinMetadata, VBlock,
    MAX_THIN_ID,
};

/// One mapping as the metadata stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub data_block: u64,
    pub time: u32,
}

/// One thin: its mappings (shared with snapshots and saved states until written) and details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thin {
    pub map: Arc<BTreeMap<u64, Mapping>>,
    pub details: DeviceDetails,
}

/// The held metadata snapshot: the thins as they were when it was reserved.
#[derive(Clone, Debug)]
pub struct Held {
    pub thins: BTreeMap<u32, Thin>,
    pub time: u32,
    pub transaction_id: u64,
    /// Every data block the snapshot names.
    pub blocks: HashSet<u64>,
}

/// Everything a commit makes durable.
#[derive(Clone, Debug)]
pub struct State {
    pub thins: BTreeMap<u32, Thin>,
    pub transaction_id: u64,
    pub time: u32,
    pub nr_data_blocks: u64,
    pub data_block_size_sectors: u32,
    pub held: Option<Arc<Held>>,
}

impl State {
    /// The state of freshly formatted metadata.
    pub fn new(opts: FormatOptions) -> Self {
        State {
            thins: BTreeMap::new(),
            transaction_id: 0,
            time: 0,
            nr_data_blocks: opts.nr_data_blocks,
            data_block_size_sectors: opts.data_block_size_sectors,
            held: None,
        }
    }

    /// Data blocks named by a thin or the held snapshot.
    pub fn blocks_in_use(&self) -> HashSet<u64> {
        let mut used: HashSet<u64> = self
            .thins
            .values()
            .flat_map(|t| t.map.values().map(|m| m.data_block))
            .collect();
        if let Some(h) = &self.held {
            used.extend(h.blocks.iter().copied());
        }
        used
    }

    /// True when the two states hold the same thins, mappings and pool figures.
    pub fn same_as(&self, other: &State) -> bool {
        self.thins == other.thins
            && self.transaction_id == other.transaction_id
            && self.time == other.time
            && self.nr_data_blocks == other.nr_data_blocks
            && self.held.is_some() == other.held.is_some()
    }

    /// The total number of mappings.
    pub fn nr_mappings(&self) -> usize {
        self.thins.values().map(|t| t.map.len()).sum()
    }
}

/// Compares what `md` holds with `st`, which has `nr_pending` extra allocated blocks.
/// Returns the first difference found.
pub fn compare_state(md: &ThinMetadata, st: &State, nr_pending: u64) -> Result<(), String> {
    let ids: Vec<u32> = md.thins().iter().map(|t| t.0).collect();
    let want: Vec<u32> = st.thins.keys().copied().collect();
    if ids != want {
        return Err(format!("thins are {ids:?}, model has {want:?}"));
    }
    for (&id, thin) in &st.thins {
        compare_thin(md, id, thin)?;
    }
    let s = md.status();
    let used = st.blocks_in_use().len() as u64 + nr_pending;
    let want = (
        st.transaction_id,
        st.time,
        st.nr_data_blocks,
        st.nr_data_blocks - used,
        st.held.is_some(),
        st.data_block_size_sectors,
    );
    let got = (
        s.transaction_id,
        s.time,
        s.nr_data_blocks,
        s.nr_free_data_blocks,
        s.held_root.is_some(),
        s.data_block_size_sectors,
    );
    if got != want {
        return Err(format!(
            "status (transaction id, time, data blocks, free data blocks, held, block size) is \
             {got:?}, model has {want:?}"
        ));
    }
    if s.nr_thins != st.thins.len() || s.needs_check {
        return Err(format!(
            "status {s:?} disagrees with the model's thin count or flags"
        ));
    }
    Ok(())
}

/// Compares one thin's details and every mapping with the model.
pub fn compare_thin(md: &ThinMetadata, id: u32, thin: &Thin) -> Result<(), String> {
    let d = md
        .details(ThinId(id))
        .map_err(|e| format!("details of thin {id}: {e}"))?;
    if d != thin.details {
        return Err(format!(
            "thin {id} details {d:?}, model has {:?}",
            thin.details
        ));
    }
    let mut want = thin.map.iter();
    let mut diff = None;
    md.for_each_mapping(ThinId(id), VBlock(0), |v, b, time| {
        let got = (
            v.0,
            Mapping {
                data_block: b.0,
                time,
            },
        );
        let w = want.next().map(|(&k, &m)| (k, m));
        if w != Some(got) {
            diff = Some(format!("thin {id} walk found {got:?}, model has {w:?}"));
            return false;
        }
        true
    })
    .map_err(|e| format!("walk of thin {id}: {e}"))?;
    if let Some(d) = diff {
        return Err(d);
    }
    if let Some(extra) = want.next() {
        return Err(format!("thin {id} walk ended; model still has {extra:?}"));
    }
    Ok(())
}

/// The live model: the current transaction, the last committed state, and the bookkeeping
/// that follows from them.
#[derive(Debug)]
pub struct Model {
    pub cur: State,
    pub committed: State,
    /// Data block -> number of (thin, virtual block) pairs naming it in `cur`.
    refs: HashMap<u64, u32>,
    /// Data block -> number of things keeping it in use: `refs`, plus one for the held
    /// snapshot naming it, plus one while it is pending. Kept so counts are O(1).
    uses: HashMap<u64, u32>,
    /// Allocated, not yet inserted.
    pub pending: BTreeSet<u64>,
    /// Blocks that became free in this transaction: not allocatable until it commits.
    freed: HashSet<u64>,
}

impl Model {
    pub fn new(st: State) -> Self {
        let mut m = Model {
            cur: st.clone(),
            committed: st,
            refs: HashMap::new(),
            uses: HashMap::new(),
            pending: BTreeSet::new(),
            freed: HashSet::new(),
        };
        m.revert();
        m
    }

    /// Abort, or reopen without committing: back to the last committed state.
    pub fn revert(&mut self) {
        self.cur = self.committed.clone();
        self.pending.clear();
        self.freed.clear();
        self.refs.clear();
        for t in self.cur.thins.values() {
            for m in t.map.values() {
                *self.refs.entry(m.data_block).or_default() += 1;
            }
        }
        self.uses = self.refs.clone();
        if let Some(h) = &self.cur.held {
            for &b in &h.blocks {
                *self.uses.entry(b).or_default() += 1;
            }
        }
    }

    pub fn commit(&mut self) {
        assert!(
            self.pending.is_empty(),
            "the workload commits only without pending blocks"
        );
        self.committed = self.cur.clone();
        self.freed.clear();
    }

    pub fn in_use(&self, b: u64) -> bool {
        self.uses.contains_key(&b)
    }

    /// Whether a block some thin maps is reachable from anywhere else.
    pub fn shared(&self, b: u64) -> bool {
        self.refs.get(&b).copied().unwrap_or(0) > 1
            || self
                .cur
                .held
                .as_ref()
                .is_some_and(|h| h.blocks.contains(&b))
    }

    pub fn nr_in_use(&self) -> u64 {
        self.uses.len() as u64
    }

    pub fn nr_free(&self) -> u64 {
        self.cur.nr_data_blocks - self.nr_in_use()
    }

    /// Free blocks that may be handed out now.
    pub fn nr_allocatable(&self) -> u64 {
        self.nr_free() - self.freed.len() as u64
    }

    pub fn lookup(&self, id: u32, v: u64) -> Option<Lookup> {
        let t = self.cur.thins.get(&id)?;
        Some(match t.map.get(&v) {
            None => Lookup::Unprovisioned,
            Some(m) => Lookup::Provisioned {
                data_block: DataBlock(m.data_block),
                shared: self.shared(m.data_block),
            },
        })
    }

    fn use_inc(&mut self, b: u64) {
        *self.uses.entry(b).or_default() += 1;
    }

    fn use_dec(&mut self, b: u64) {
        let n = self
            .uses
            .get_mut(&b)
            .expect("model: release of an unused block");
        *n -= 1;
        if *n == 0 {
            self.uses.remove(&b);
            self.freed.insert(b);
        }
    }

    fn inc(&mut self, b: u64) {
        *self.refs.entry(b).or_default() += 1;
        self.use_inc(b);
    }

    fn dec(&mut self, b: u64) {
        let n = self
            .refs
            .get_mut(&b)
            .expect("model: dec of an unreferenced block");
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&b);
        }
        self.use_dec(b);
    }

    /// Checks that `b` may be handed out by an allocation and records it as pending.
    pub fn alloc(&mut self, b: u64) -> Result<(), String> {
        if b >= self.cur.nr_data_blocks {
            return Err(format!("allocated block {b} is past the end"));
        }
        if self.in_use(b) {
            return Err(format!("allocated block {b}, which is in use"));
        }
        if self.freed.contains(&b) {
            return Err(format!(
                "allocated block {b}, which was freed in this transaction (the last commit \
                 may still name it)"
            ));
        }
        self.pending.insert(b);
        self.use_inc(b);
        Ok(())
    }

    pub fn release(&mut self, b: u64) {
        assert!(
            self.pending.remove(&b),
            "model: release of a block not pending"
        );
        self.use_dec(b);
    }

    pub fn create_thin(&mut self, id: u32) {
        let details = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.cur.transaction_id,
            creation_time: self.cur.time,
            snapshotted_time: self.cur.time,
        };
        let map = Arc::new(BTreeMap::new());
        self.cur.thins.insert(id, Thin { map, details });
    }

    pub fn create_snap(&mut self, id: u32, origin: u32) {
        self.cur.time += 1;
        let time = self.cur.time;
        let o = self
            .cur
            .thins
            .get_mut(&origin)
            .expect("model: origin exists");
        o.details.snapshotted_time = time;
        let map = o.map.clone();
        let details = DeviceDetails {
            mapped_blocks: map.len() as u64,
            transaction_id: self.cur.transaction_id,
            creation_time: time,
            snapshotted_time: time,
        };
        let blocks: Vec<u64> = map.values().map(|m| m.data_block).collect();
        self.cur.thins.insert(id, Thin { map, details });
        for b in blocks {
            self.inc(b);
        }
    }

    pub fn delete_thin(&mut self, id: u32) {
        let t = self.cur.thins.remove(&id).expect("model: thin exists");
        for m in t.map.values() {
            self.dec(m.data_block);
        }
    }

    /// Maps `v` to the pending block `b`.
    pub fn insert(&mut self, id: u32, v: u64, b: u64) {
        assert!(
            self.pending.remove(&b),
            "model: insert of a block not pending"
        );
        self.inc(b);
        self.use_dec(b);
        let time = self.cur.time;
        let t = self.cur.thins.get_mut(&id).expect("model: thin exists");
        let old = Arc::make_mut(&mut t.map).insert(
            v,
            Mapping {
                data_block: b,
                time,
            },
        );
        t.details.mapped_blocks = t.map.len() as u64;
        if let Some(old) = old {
            self.dec(old.data_block);
        }
    }

    /// Unmaps `[begin, end)`; returns how many were mapped.
    pub fn remove_range(&mut self, id: u32, begin: u64, end: u64) -> u64 {
        let t = self.cur.thins.get_mut(&id).expect("model: thin exists");
        let keys: Vec<u64> = t.map.range(begin..end).map(|(&k, _)| k).collect();
        if keys.is_empty() {
            return 0;
        }
        let map = Arc::make_mut(&mut t.map);
        let gone: Vec<u64> = keys
            .iter()
            .filter_map(|k| map.remove(k).map(|m| m.data_block))
            .collect();
        t.details.mapped_blocks = t.map.len() as u64;
        for b in &gone {
            self.dec(*b);
        }
        gone.len() as u64
    }

    pub fn reserve_held(&mut self) {
        let blocks = self
            .cur
            .thins
            .values()
            .flat_map(|t| t.map.values().map(|m| m.data_block))
            .collect();
        let held = Arc::new(Held {
            thins: self.cur.thins.clone(),
            time: self.cur.time,
            transaction_id: self.cur.transaction_id,
            blocks,
        });
        for &b in &held.blocks {
            self.use_inc(b);
        }
        self.cur.held = Some(held);
    }

    pub fn release_held(&mut self) {
        let h = self.cur.held.take().expect("model: a snapshot is held");
        for &b in &h.blocks {
            self.use_dec(b);
        }
    }
}

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
