//! A whole-pool model: random requests from many concurrent tasks, checked byte for byte
//! against a model of every thin. Shared by the seeded test (`tests/model.rs`) and the
//! cargo-fuzz target (`fuzz/fuzz_targets/pool_model.rs`): both feed `run` a byte string, which
//! decides everything (pool geometry and policies, phases, tasks, their operations), so a
//! failing seed or fuzz input replays the same operations (the interleaving of threads may
//! differ; the checks accept every outcome a correct pool may produce).
//!
//! The run is a sequence of *phases*. In each, a few *owner* tasks and one *control* task run
//! concurrently, spread over one to a few OS threads sharing the pool. Each owner owns a
//! disjoint range of virtual blocks in every thin: only it writes, discards or write-zeroes
//! there, so it knows the exact bytes of its blocks and checks its reads exactly. Any task may
//! also read blocks it does not own ("foreign" reads); those are checked against every
//! version of each block that existed at some time during the read. The control task creates
//! thins, takes live snapshots of thins being written, deletes thins nobody has open (and
//! checks that deleting an open one is refused), grows the data space and commits. A snapshot
//! taken under writes is read back at once and each block must equal a version of the
//! origin's block that existed while `create_snap` ran.
//!
//! Between phases the pool is quiescent, and the run checks: every block of every thin reads
//! as the model says; each thin's `mapped_blocks` equals the model's provisioned blocks; the
//! pool's used data blocks equal the distinct data blocks the thins map (no leak); a
//! full-block write to an unprovisioned block succeeds exactly when a data block is free (so
//! ENOSPC means out of space); and, when the pool is closed and reopened (most phases),
//! `thin_metadata::check` finds no problem and everything still reads back.
//!
//! The only errors requests may get are `NoDataSpace` and `NoMetadataSpace` (and `Busy` for a
//! delete of an open thin); anything else, EIO above all, fails the run. A request that fails
//! part way leaves each of its blocks either as it was or as the request would have made it:
//! the owner reads them back and the model adopts what it finds, after checking it is one of
//! the two.
//!
//! Everything panics on a mismatch, with a message saying where; `run` returns a summary.

mod check;
mod devices;
mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use block_io::data::{rt, DataGeometry, IoBuf, MemDataDevice};
use block_io::{MemMetaDevice, MetaDevice};
use parking_lot::Mutex;

use crate::{NoSpacePolicy, Pool, PoolConfig, PoolError, Thin};
use check::{probe, quiesce_and_check};
use devices::{mix, GrowableMeta, JitterDevice};
use state::{describe, is_zero, overlay, split, Block, Input, Kind, Model, Version, OPEN};

/// How a run may use the machine.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most OS threads a phase spreads its tasks over (at least 1).
    pub max_threads: usize,
    /// Most phases a run has (it also ends when the input runs out).
    pub max_phases: usize,
    /// Most input bytes one owner task takes per phase (about 6 per operation).
    pub max_task_bytes: usize,
    /// Let the data device sleep (a few tens of microseconds) now and then, so that requests
    /// on different threads really overlap. Off for fuzzing, where time is noise.
    pub sleeps: bool,
    /// Print every operation to stderr.
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_threads: 3,
            max_phases: 64,
            max_task_bytes: 240,
            sleeps: true,
            trace: false,
        }
    }
}

impl Options {
    /// For the fuzzer: one thread, no sleeps, few phases.
    pub fn fuzz() -> Self {
        Options {
            max_threads: 1,
            max_phases: 8,
            max_task_bytes: 160,
            sleeps: false,
            trace: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub phases: u64,
    pub reads: u64,
    pub foreign_reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub flushes: u64,
    pub snapshots: u64,
    pub deletes: u64,
    pub busy_deletes: u64,
    pub creates: u64,
    pub grows: u64,
    pub commits: u64,
    pub reopens: u64,
    pub no_data_space: u64,
    pub no_metadata_space: u64,
    pub partial_failures: u64,
    pub probes: u64,
    pub metadata_grows: u64,
}

impl Summary {
    /// Requests issued by owner tasks.
    pub fn requests(&self) -> u64 {
        self.reads
            + self.foreign_reads
            + self.writes
            + self.discards
            + self.write_zeroes
            + self.flushes
    }
}

/// Everything the tasks of a phase share.
struct Ctx<'a> {
    pool: &'a Pool,
    dev: &'a JitterDevice,
    model: &'a Mutex<Model>,
    /// Thins open for the whole phase: owners write to them; they cannot be deleted.
    active: Vec<(u32, Thin)>,
    nr_owners: u64,
    bs: u64,
    align: u64,
    max_user_id: u32,
    max_live_thins: usize,
    data_device_blocks: u64,
    phase: u64,
    trace: bool,
}

impl Ctx<'_> {
    fn region(&self, owner: u64) -> (u64, u64) {
        let nv = self.model.lock().nr_vblocks;
        (
            owner * nv / self.nr_owners,
            (owner + 1) * nv / self.nr_owners,
        )
    }

    fn trace(&self, who: &str, what: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!("phase {} {who}: {what}", self.phase);
        }
    }

    /// A byte range inside blocks `[lo, hi)`: within one block, one whole block, or across
    /// up to three blocks.
    fn range(&self, input: &mut Input<'_>, lo: u64, hi: u64) -> (u64, u64) {
        let (bs, align) = (self.bs, self.align);
        let start_block = lo + input.below(hi - lo);
        match input.below(4) {
            0 => (start_block * bs, bs),
            1 => {
                let units = bs / align;
                let first = input.below(units);
                let n = 1 + input.below(units - first);
                (start_block * bs + first * align, n * align)
            }
            _ => {
                let start = start_block * bs + input.below(bs / align) * align;
                let end_limit = hi * bs;
                let max_units = ((3 * bs).min(end_limit - start)) / align;
                let n = 1 + input.below(max_units);
                (start, n * align)
            }
        }
    }

    fn thin(&self, id: u32) -> &Thin {
        &self
            .active
            .iter()
            .find(|(t, _)| *t == id)
            .expect("active thin")
            .1
    }
}

/// Space errors are what requests may get; anything else fails the run.
fn expect_space(r: &PoolError, what: &dyn std::fmt::Display, model: &Mutex<Model>) {
    match r {
        PoolError::NoDataSpace => model.lock().summary.no_data_space += 1,
        PoolError::NoMetadataSpace => model.lock().summary.no_metadata_space += 1,
        e => panic!("{what}: unexpected error {e:?} (errno {})", e.errno()),
    }
}

/// An owner task: requests on its own blocks of the active thins, and foreign reads.
async fn owner(ctx: &Ctx<'_>, me: u64, mut input: Input<'_>) {
    let (lo, hi) = ctx.region(me);
    let who = format!("owner {me} [{lo}, {hi})");
    while !input.is_empty() {
        let (thin_id, thin) = {
            let (id, t) = &ctx.active[input.below(ctx.active.len() as u64) as usize];
            (*id, t)
        };
        match input.below(100) {
            0..=34 => {
                let (off, len) = ctx.range(&mut input, lo, hi);
                let fua = input.ratio(1, 8);
                let zeros = input.ratio(1, 12);
                ctx.trace(
                    &who,
                    format_args!("write thin {thin_id} {off}+{len} fua={fua} zeros={zeros}"),
                );
                let data = {
                    let mut m = ctx.model.lock();
                    m.summary.writes += 1;
                    let seq = m.tick();
                    if zeros {
                        vec![0; len as usize]
                    } else {
                        Model::stamp(seq, len as usize)
                    }
                };
                let f = thin.write(ctx.dev, off, IoBuf::from_slice(&data), fua);
                change(ctx, thin_id, off, len, Kind::Write, &data, async {
                    f.await.0
                })
                .await;
            }
            35..=59 => {
                let (off, len) = ctx.range(&mut input, lo, hi);
                ctx.trace(&who, format_args!("read thin {thin_id} {off}+{len}"));
                ctx.model.lock().summary.reads += 1;
                let (r, buf) = thin.read(ctx.dev, off, IoBuf::new(len as usize)).await;
                if let Err(e) = r {
                    panic!("{who}: read thin {thin_id} {off}+{len}: {e:?}");
                }
                let m = ctx.model.lock();
                for p in split(off, len, ctx.bs) {
                    let cur = m.thins[&thin_id][p.vblock as usize].current();
                    let got = &buf[p.buf_off..p.buf_off + p.len];
                    if !cur.matches(p.offset, got) {
                        panic!(
                            "{who}: read thin {thin_id} {off}+{len}: block {} bytes {}+{} \
                             differ from the model ({})",
                            p.vblock,
                            p.offset,
                            p.len,
                            describe(cur, p.offset, got)
                        );
                    }
                }
            }
            60..=69 => {
                let nv = ctx.model.lock().nr_vblocks;
                let (off, len) = ctx.range(&mut input, 0, nv);
                ctx.trace(
                    &who,
                    format_args!("foreign read thin {thin_id} {off}+{len}"),
                );
                foreign_read(ctx, &who, thin_id, thin, off, len).await;
            }
            70..=79 => {
                let (off, len) = ctx.range(&mut input, lo, hi);
                ctx.trace(&who, format_args!("discard thin {thin_id} {off}+{len}"));
                ctx.model.lock().summary.discards += 1;
                let f = thin.discard(ctx.dev, off, len);
                change(ctx, thin_id, off, len, Kind::Discard, &[], f).await;
            }
            80..=86 => {
                let (off, len) = ctx.range(&mut input, lo, hi);
                ctx.trace(
                    &who,
                    format_args!("write_zeroes thin {thin_id} {off}+{len}"),
                );
                ctx.model.lock().summary.write_zeroes += 1;
                let f = thin.write_zeroes(ctx.dev, off, len);
                change(ctx, thin_id, off, len, Kind::WriteZeroes, &[], f).await;
            }
            87..=92 => {
                ctx.trace(&who, format_args!("flush thin {thin_id}"));
                ctx.model.lock().summary.flushes += 1;
                if let Err(e) = thin.flush(ctx.dev).await {
                    panic!("{who}: flush of thin {thin_id}: {e:?}");
                }
            }
            _ => pause(ctx, &mut input).await,
        }
    }
}

async fn pause(ctx: &Ctx<'_>, input: &mut Input<'_>) {
    if ctx.dev.sleeps && input.ratio(1, 4) {
        rt::sleep(Duration::from_micros(50 + input.below(200))).await;
    } else {
        for _ in 0..=input.below(4) {
            rt::yield_now().await;
        }
    }
}

/// A read anywhere in a thin: each block must equal a version visible during the read.
async fn foreign_read(ctx: &Ctx<'_>, who: &str, thin_id: u32, thin: &Thin, off: u64, len: u64) {
    let s = {
        let mut m = ctx.model.lock();
        m.summary.foreign_reads += 1;
        m.tick()
    };
    let (r, buf) = thin.read(ctx.dev, off, IoBuf::new(len as usize)).await;
    if let Err(e) = r {
        panic!("{who}: foreign read thin {thin_id} {off}+{len}: {e:?}");
    }
    let mut m = ctx.model.lock();
    let e = m.tick();
    for p in split(off, len, ctx.bs) {
        let block = &m.thins[&thin_id][p.vblock as usize];
        let got = &buf[p.buf_off..p.buf_off + p.len];
        if !block.visible(s, e).any(|v| v.matches(p.offset, got)) {
            panic!(
                "{who}: foreign read thin {thin_id} {off}+{len} (seq {s}..{e}): block {} bytes \
                 {}+{} match no version visible meanwhile ({} versions; current: {})",
                p.vblock,
                p.offset,
                p.len,
                block.versions.len(),
                describe(block.current(), p.offset, got)
            );
        }
    }
}

/// Runs a request that changes `[off, off + len)` of an owned range, with the model's
/// versions around it; on a space error, reads the blocks back and adopts what it finds.
async fn change(
    ctx: &Ctx<'_>,
    thin_id: u32,
    off: u64,
    len: u64,
    kind: Kind,
    data: &[u8],
    request: impl Future<Output = crate::Result<()>>,
) {
    let bs = ctx.bs;
    let parts = split(off, len, bs);
    // The blocks that change, with the version each had before.
    let mut touched: Vec<(u64, Version)> = Vec::new();
    {
        let mut m = ctx.model.lock();
        let s = m.tick();
        let bsz = m.bs;
        for p in &parts {
            let whole = p.offset == 0 && p.len as u64 == bs;
            let block = m.block(thin_id, p.vblock);
            let cur = block.current().clone();
            let new = match kind {
                Kind::Write => {
                    let d = &data[p.buf_off..p.buf_off + p.len];
                    let nonzero = !is_zero(d);
                    Version {
                        from: s,
                        until: OPEN,
                        bytes: Some(overlay(&cur, bsz, p.offset, d)),
                        // Zeros on an unprovisioned block allocate nothing.
                        prov: match cur.prov {
                            Some(true) => Some(true),
                            _ if nonzero => Some(true),
                            p => p,
                        },
                    }
                }
                Kind::Discard | Kind::WriteZeroes if whole => Version {
                    from: s,
                    until: OPEN,
                    bytes: None,
                    prov: Some(false),
                },
                // A discard leaves partial blocks alone.
                Kind::Discard => continue,
                Kind::WriteZeroes => Version {
                    from: s,
                    until: OPEN,
                    bytes: Some(overlay(&cur, bsz, p.offset, &vec![0; p.len])),
                    prov: cur.prov,
                },
            };
            block.versions.push(new);
            touched.push((p.vblock, cur));
        }
    }
    let r = request.await;
    let what = format!("{kind:?} thin {thin_id} {off}+{len}");
    let failed = match r {
        Ok(()) => false,
        Err(e) => {
            if kind == Kind::Discard && matches!(e, PoolError::NoDataSpace) {
                panic!("{what}: a discard needs no data space, yet got {e:?}");
            }
            expect_space(&e, &what, ctx.model);
            true
        }
    };
    // On failure, what each block holds now (nobody else changes them).
    let mut found = Vec::new();
    if failed {
        for (v, _) in &touched {
            let (r, buf) = ctx
                .thin(thin_id)
                .read(ctx.dev, v * bs, IoBuf::new(bs as usize))
                .await;
            if let Err(e) = r {
                panic!("{what}: reading block {v} back after the failure: {e:?}");
            }
            found.push(buf);
        }
    }
    let mut m = ctx.model.lock();
    let e = m.tick();
    if failed {
        m.summary.partial_failures += 1;
    }
    for (i, (v, old)) in touched.into_iter().enumerate() {
        let block = m.block(thin_id, v);
        let new = block.current().clone();
        let last = if failed {
            let got = &found[i][..];
            match (new.matches(0, got), old.matches(0, got)) {
                (true, false) => new,
                (false, true) => old,
                // Same bytes either way: the mapping is known only if both agree.
                (true, true) => Version {
                    prov: if old.prov == new.prov { old.prov } else { None },
                    ..new
                },
                (false, false) => panic!(
                    "{what} failed, and block {v} now holds neither its old bytes nor the new \
                     ones ({})",
                    describe(&new, 0, got)
                ),
            }
        } else {
            new
        };
        block.settle(e, last);
    }
}

/// The control task: thins, snapshots, deletes, grows, commits.
async fn control(ctx: &Ctx<'_>, mut input: Input<'_>) {
    let who = "control";
    while !input.is_empty() {
        let live: Vec<u32> = ctx.model.lock().thins.keys().copied().collect();
        let free_id = (1..=ctx.max_user_id).find(|i| !live.contains(i));
        let room = live.len() < ctx.max_live_thins;
        match input.below(10) {
            0..=2 if room && !live.is_empty() => {
                let origin = live[input.below(live.len() as u64) as usize];
                let snap = free_id.expect("room means a free id");
                ctx.trace(who, format_args!("create_snap {snap} of {origin}"));
                snapshot(ctx, snap, origin).await;
            }
            3 | 4 if !live.is_empty() => {
                let id = live[input.below(live.len() as u64) as usize];
                ctx.trace(who, format_args!("delete {id}"));
                let open = ctx.active.iter().any(|(t, _)| *t == id);
                match (ctx.pool.delete_thin(id), open) {
                    (Ok(()), false) => {
                        let mut m = ctx.model.lock();
                        m.thins.remove(&id);
                        m.summary.deletes += 1;
                    }
                    (Err(PoolError::Busy(b)), true) if b == id => {
                        ctx.model.lock().summary.busy_deletes += 1;
                    }
                    (Err(e), false) => expect_space(&e, &format!("delete {id}"), ctx.model),
                    (r, open) => panic!("delete of thin {id} (open: {open}): {r:?}"),
                }
            }
            5 if room => {
                let id = free_id.expect("room means a free id");
                ctx.trace(who, format_args!("create {id}"));
                match ctx.pool.create_thin(id) {
                    Ok(()) => {
                        let mut m = ctx.model.lock();
                        let nv = m.nr_vblocks;
                        m.thins.insert(id, (0..nv).map(|_| Block::zero()).collect());
                        m.summary.creates += 1;
                    }
                    Err(e) => expect_space(&e, &format!("create {id}"), ctx.model),
                }
            }
            6 => {
                let now = ctx.pool.status().nr_data_blocks;
                if now < ctx.data_device_blocks {
                    let to = (now + 1 + input.below(16)).min(ctx.data_device_blocks);
                    ctx.trace(who, format_args!("grow data {now} -> {to}"));
                    if let Err(e) = ctx.pool.grow_data(to) {
                        panic!("grow data to {to}: {e:?}");
                    }
                    ctx.model.lock().summary.grows += 1;
                }
            }
            7 => {
                ctx.trace(who, format_args!("commit"));
                if let Err(e) = ctx.pool.commit().await {
                    panic!("commit: {e:?}");
                }
                ctx.model.lock().summary.commits += 1;
            }
            _ => pause(ctx, &mut input).await,
        }
    }
}

/// A live snapshot, read back at once: each block must be a version the origin's block had
/// while `create_snap` ran.
async fn snapshot(ctx: &Ctx<'_>, snap: u32, origin: u32) {
    let s = ctx.model.lock().tick();
    let r = ctx.pool.create_snap(snap, origin).await;
    let e = ctx.model.lock().tick();
    if let Err(err) = r {
        expect_space(&err, &format!("create_snap {snap} of {origin}"), ctx.model);
        return;
    }
    let thin = match ctx.pool.open_thin(snap) {
        Ok(t) => t,
        Err(err) => panic!("open of the new snapshot {snap}: {err:?}"),
    };
    let (nv, bs) = {
        let m = ctx.model.lock();
        (m.nr_vblocks, m.bs)
    };
    let mut blocks = Vec::with_capacity(nv as usize);
    for v in 0..nv {
        let (r, buf) = thin.read(ctx.dev, v * bs as u64, IoBuf::new(bs)).await;
        if let Err(err) = r {
            panic!("reading snapshot {snap} of {origin} block {v}: {err:?}");
        }
        let m = ctx.model.lock();
        let ob = &m.thins[&origin][v as usize];
        let mut prov: Option<Option<bool>> = None;
        for ver in ob.visible(s, e).filter(|ver| ver.matches(0, &buf)) {
            prov = Some(match prov {
                None => ver.prov,
                Some(p) if p == ver.prov => p,
                Some(_) => None,
            });
        }
        let Some(prov) = prov else {
            panic!(
                "snapshot {snap} of {origin} (seq {s}..{e}): block {v} matches no version of \
                 the origin's block visible meanwhile (current: {})",
                describe(ob.current(), 0, &buf)
            );
        };
        blocks.push(Block {
            versions: vec![Version {
                from: 0,
                until: OPEN,
                bytes: (!is_zero(&buf)).then(|| Arc::from(&buf[..])),
                prov,
            }],
        });
    }
    let mut m = ctx.model.lock();
    m.thins.insert(snap, blocks);
    m.summary.snapshots += 1;
}

/// Pool settings drawn from the input.
#[derive(Debug, Clone)]
struct Setup {
    bs: u64,
    align: u64,
    nr_data_blocks: u64,
    data_device_blocks: u64,
    meta_blocks: u64,
    meta_device_blocks: u64,
    nr_vblocks: u64,
    cfg: PoolConfig,
}

fn setup(input: &mut Input<'_>) -> Setup {
    let bs = [4096, 8192, 16384, 65536][input.below(4) as usize];
    let align = [512, 4096][input.below(2) as usize];
    let nr_data_blocks = 8 + input.below(120);
    let meta_blocks = if input.ratio(1, 4) {
        96 + input.below(64)
    } else {
        256 + input.below(256)
    };
    let no_space = if input.ratio(3, 4) {
        NoSpacePolicy::Error
    } else {
        NoSpacePolicy::Queue {
            timeout: Duration::from_millis(1 + input.below(6)),
        }
    };
    let cfg = PoolConfig {
        reserve_blocks: input.below(9),
        reserve_refill_batch: 1 + input.below(4),
        reserve_zeroing: if input.ratio(1, 2) {
            crate::ReserveZeroing::WriteZeroes
        } else {
            crate::ReserveZeroing::Primitive
        },
        reserve_busy_pause: Duration::from_micros(100 + input.below(1000)),
        low_water_mark_blocks: input.below(8),
        no_space,
        commit_interval: Duration::from_millis(5 + input.below(200)),
        discard_passdown: input.ratio(3, 4),
        discard_batch_blocks: 1 + input.below(8),
        delete_batch_blocks: 1 + input.below(16),
        on_event: None,
        change_log: None,
    };
    Setup {
        bs,
        align,
        nr_data_blocks,
        data_device_blocks: nr_data_blocks + 32,
        meta_blocks,
        meta_device_blocks: meta_blocks + 2048,
        nr_vblocks: 4 + input.below(28),
        cfg,
    }
}

/// Runs the model on `input`; panics on any disagreement (see the module docs).
pub fn run(input: &[u8], opts: &Options) -> Summary {
    let mut input = Input::new(input);
    let st = setup(&mut input);
    if opts.trace {
        eprintln!("setup: {st:?}");
    }
    let geometry =
        DataGeometry::new(st.bs, st.data_device_blocks, st.align).expect("model geometry is valid");
    let dev = Arc::new(JitterDevice {
        inner: MemDataDevice::new(geometry),
        ctr: AtomicU64::new(0),
        seed: mix(input.data.len() as u64 ^ u64::from(input.data.first().copied().unwrap_or(0))),
        sleeps: opts.sleeps,
    });
    let meta = Arc::new(GrowableMeta {
        inner: MemMetaDevice::new(st.meta_device_blocks),
        visible: AtomicU64::new(st.meta_blocks),
    });
    let factory = {
        let dev = dev.clone();
        move || Ok(dev.clone())
    };
    let meta_dyn: Arc<dyn MetaDevice> = meta.clone();
    thin_metadata::ThinMetadata::format(
        meta_dyn.clone(),
        thin_metadata::FormatOptions {
            data_block_size_sectors: (st.bs / 512) as u32,
            nr_data_blocks: st.nr_data_blocks,
        },
    )
    .expect("format the model's metadata");
    let mut pool = Some(Arc::new(open(&meta_dyn, &st, factory.clone())));
    let model = Mutex::new(Model {
        seq: 0,
        bs: st.bs as usize,
        nr_vblocks: st.nr_vblocks,
        thins: BTreeMap::new(),
        summary: Summary::default(),
    });
    let mut phase = 0u64;
    while !input.is_empty() && (phase as usize) < opts.max_phases {
        phase += 1;
        let p = pool.as_ref().expect("pool open").clone();
        if model.lock().thins.is_empty() {
            p.create_thin(1).expect("create the first thin");
            let nv = st.nr_vblocks;
            model
                .lock()
                .thins
                .insert(1, (0..nv).map(|_| Block::zero()).collect());
        }
        let live: Vec<u32> = model.lock().thins.keys().copied().collect();
        let mut active: Vec<u32> = live.iter().copied().filter(|_| input.ratio(3, 4)).collect();
        if active.is_empty() {
            active.push(live[input.below(live.len() as u64) as usize]);
        }
        let nr_owners = 1 + input.below(st.nr_vblocks.min(6));
        let nr_threads = 1 + input.below(opts.max_threads.max(1) as u64) as usize;
        let mut inputs = Vec::new();
        for _ in 0..nr_owners {
            let n = 1 + input.below(opts.max_task_bytes as u64) as usize;
            inputs.push(input.split(n));
        }
        let nr_control = input.below(48) as usize;
        let control_input = input.split(nr_control);
        if opts.trace {
            eprintln!(
                "phase {phase}: active {active:?} of {live:?}, {nr_owners} owners, \
                 {nr_threads} threads"
            );
        }
        let ctx = Ctx {
            pool: &p,
            dev: &dev,
            model: &model,
            active: active
                .iter()
                .map(|&id| (id, p.open_thin(id).expect("open an active thin")))
                .collect(),
            nr_owners,
            bs: st.bs,
            align: st.align,
            max_user_id: 10,
            max_live_thins: 6,
            data_device_blocks: st.data_device_blocks,
            phase,
            trace: opts.trace,
        };
        run_phase(&ctx, inputs, control_input, nr_threads);
        drop(ctx);
        model.lock().summary.phases += 1;

        let reopen = input.ratio(2, 3) || input.is_empty();
        quiesce_and_check(&p, &dev, &meta, &model, phase);
        probe(&p, &dev, &model, &st, phase);
        drop(p);
        if reopen {
            let p = Arc::try_unwrap(pool.take().expect("pool open"))
                .expect("nothing else holds the pool");
            p.close().expect("close the pool");
            let report = thin_metadata::check::check(&*meta, &Default::default());
            assert!(
                report.is_clean(),
                "phase {phase}: the metadata does not check clean after close: {report:?}"
            );
            let p = Arc::new(open(&meta_dyn, &st, factory.clone()));
            model.lock().summary.reopens += 1;
            quiesce_and_check(&p, &dev, &meta, &model, phase);
            pool = Some(p);
        }
    }
    let p = Arc::try_unwrap(pool.take().expect("pool open")).expect("nothing holds the pool");
    p.close().expect("close the pool at the end");
    let report = thin_metadata::check::check(&*meta, &Default::default());
    assert!(
        report.is_clean(),
        "the metadata does not check clean at the end: {report:?}"
    );
    let summary = model.lock().summary.clone();
    summary
}

fn open<F>(meta: &Arc<dyn MetaDevice>, st: &Setup, factory: F) -> Pool
where
    F: Fn() -> std::io::Result<Arc<JitterDevice>> + Send + Sync + 'static,
{
    Pool::open(meta.clone(), st.cfg.clone(), factory).expect("open the model's pool")
}

type Task<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Runs the owners and the control task of a phase, spread over `nr_threads` threads.
fn run_phase(ctx: &Ctx<'_>, inputs: Vec<Input<'_>>, control_input: Input<'_>, nr_threads: usize) {
    let mut per_thread: Vec<Vec<(Option<u64>, Input<'_>)>> = vec![Vec::new(); nr_threads];
    per_thread[0].push((None, control_input));
    for (i, inp) in inputs.into_iter().enumerate() {
        per_thread[i % nr_threads].push((Some(i as u64), inp));
    }
    std::thread::scope(|scope| {
        for work in per_thread {
            scope.spawn(move || {
                let tasks: Vec<Task<'_>> = work
                    .into_iter()
                    .map(|(who, inp)| -> Task<'_> {
                        match who {
                            Some(me) => Box::pin(owner(ctx, me, inp)),
                            None => Box::pin(control(ctx, inp)),
                        }
                    })
                    .collect();
                rt::block_on(rt::join_all(tasks));
            });
        }
    });
}
