//! The model itself: committed states, and the live transaction with the bookkeeping that
//! makes its counts O(1) (see the parent module for what is asserted against it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use thin_metadata::{
    DataBlock, DeviceDetails, FormatOptions, Lookup, ThinId, ThinMetadata, VBlock,
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
