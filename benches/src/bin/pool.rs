//! The thin-pool engine driven as ublk drives it, against io_uring written by hand, on the same
//! O_DIRECT file in the same run.
//!
//! "As ublk does": one benchmark thread with block-io's standalone ring, a `UringDataDevice`
//! on it, and QD concurrent tasks under `block_on`/`join_all`, each awaiting one 4 KiB
//! `Thin::read`/`Thin::write` at a time (QD 1 and 32). The pool's committer and worker get
//! their own engines from the factory. The raw side is one io_uring with QD operations in
//! flight, doing the same I/O the pool must do at the same places:
//!
//! - `randread`/`randwrite`: random 4 KiB reads and overwrites of a fully provisioned thin;
//!   raw does them on the very data blocks the thin maps. Interleaved in three slices per case
//!   (as data_io.rs does) so a noisy neighbour hits both sides alike. Goal 0.95.
//! - `first_write_reserve`: 4 KiB writes at a random offset into unprovisioned 64 KiB blocks,
//!   taken from a full pre-zeroed reserve: in rounds, each waiting until the reserve is full
//!   and writing fewer blocks than it holds, so every one is served from blocks zeroed before
//!   the round (the counts are printed); between rounds the blocks are discarded (no
//!   passdown) and committed, untimed. Raw: 4 KiB writes at the same device positions, same
//!   order and QD. Goal 0.8. A second raw pass, after `fallocate(ZERO_RANGE)` of those
//!   blocks (what the pool's zeroing does to a regular file), is the FIGURE
//!   `raw_first_write_<case>_zeroed_qd<n>_iops`: a write into an unwritten extent costs the
//!   filesystem an extent conversion that a write into written data does not, and
//!   `pool_first_write_reserve_qd<n>_vs_raw_zeroed` separates that from the engine's cost.
//! - `first_write_noreserve`: the same with `reserve_blocks = 0`, so each write zeroes its
//!   block first. Printed as FIGUREs (`..._vs_raw`, unit ratio), not a RATIO: the issue sets
//!   no goal for it; it shows what the reserve saves.
//! - `break_sharing`: 4 KiB writes to the origin, each into a different block shared with a
//!   snapshot (copy 64 KiB, then write). Raw per operation: read 64 KiB from the old block,
//!   write it to the new one, write 4 KiB into the new one, at the same positions (the pool
//!   lays the 4 KiB over the copy and writes the block once: raw is the naive copy-plus-write
//!   the issue measures against, not a mirror of the pool's I/O). In rounds: snapshot, break,
//!   delete the snapshot and let the background free it (untimed). Goal 0.9.
//! - `flush_p99`: 31 tasks of random 4 KiB overwrites of provisioned blocks plus one task
//!   flushing in a loop; each `Thin::flush`'s latency. Raw: 31 write slots plus one slot
//!   issuing `fdatasync` (IORING_OP_FSYNC with DATASYNC) in a loop. RATIO value = raw p99 /
//!   our p99, goal 0.5 (higher is better). A FIGURE variant mixes first writes into the
//!   writers (one write in 8 provisions a block, paced over the run as space allows), so
//!   flushes commit metadata; the counts of flushes and commits are printed.
//!
//! Data file: under /var/tmp (`$POOL_BENCH_DIR` to move it), 1 GiB (`--quick`: 256 MiB),
//! created with `Prealloc::WriteZeroes` (zeros written once, so no write hits a hole or an
//! unwritten extent of the filesystem except where the pool itself zeroes a block, which on a
//! regular file is `fallocate(ZERO_RANGE)`). Metadata: a `FileMetaDevice` beside it. Each
//! scenario formats a fresh pool over the same data file. Both files are removed at the end.

use block_io::data::rt::{block_on, join_all};
use block_io::data::{AnyDataDevice, DataDeviceOptions, EngineChoice, IoBuf, Prealloc};
use block_io::{FileMetaDevice, MetaDevice};
use io_uring::{opcode, types, IoUring};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thin_metadata::{ThinId, VBlock};
use thin_pool::{Pool, PoolConfig, Thin};
use ublk_thin_benches::{figure, ratio, Options};

const IO_SIZE: usize = 4096;
const BLOCK_SIZE: u64 = 64 * 1024;
const NR_SLICES: u32 = 3;
const META_BLOCKS: u64 = 4096;
const FLUSH_WRITERS: usize = 31;
/// In the flush variant with first writes, one write in this many provisions a block.
const FIRST_WRITE_EVERY: u64 = 8;

/// The benchmark's files, removed when dropped (also when a panic unwinds).
struct Files {
    data: PathBuf,
    meta: PathBuf,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.data);
        let _ = std::fs::remove_file(&self.meta);
    }
}

struct Sizes {
    nr_blocks: u64,
    /// Provisioned blocks of the thin for the read/write/flush cases.
    nr_provisioned: u64,
    case_time: Duration,
    flush_time: Duration,
    /// First writes measured at QD1 and QD32 (each below the reserve size).
    nr_first: [usize; 2],
    reserve_blocks: u64,
    /// Sharing breaks measured at QD1 and QD32.
    nr_breaks: [usize; 2],
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                nr_blocks: 4096,
                nr_provisioned: 2048,
                case_time: Duration::from_secs(1),
                flush_time: Duration::from_secs(2),
                nr_first: [3000, 9000],
                reserve_blocks: 1024,
                nr_breaks: [1000, 3000],
            }
        } else {
            Sizes {
                nr_blocks: 16384,
                nr_provisioned: 8192,
                case_time: Duration::from_secs(3),
                flush_time: Duration::from_secs(5),
                nr_first: [12000, 36000],
                reserve_blocks: 4096,
                nr_breaks: [4000, 12000],
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw io_uring: QD slots, each running a job (a few dependent steps) at a time.

#[derive(Clone, Copy, Debug)]
enum Step {
    Read { off: u64, len: usize },
    Write { off: u64, len: usize },
    Fdatasync,
}

type Job = Vec<Step>;

/// Runs jobs from `next(slot)` on `nr_slots` slots until every slot got `None`; calls
/// `done(slot, latency)` for each finished job. Each slot owns a 64 KiB buffer.
fn run_raw(
    file: &File,
    nr_slots: usize,
    mut next: impl FnMut(usize) -> Option<Job>,
    mut done: impl FnMut(usize, Duration),
) {
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(64)
        .expect("raw io_uring");
    ring.submitter()
        .register_files(&[file.as_raw_fd()])
        .expect("register file");
    let mut bufs: Vec<IoBuf> = (0..nr_slots)
        .map(|_| IoBuf::filled(BLOCK_SIZE as usize, 0x5a))
        .collect();
    // (job, next step, start)
    let mut jobs: Vec<Option<(Job, usize, Instant)>> = (0..nr_slots).map(|_| None).collect();
    let push = |ring: &mut IoUring, bufs: &mut [IoBuf], slot: usize, step: Step| {
        let fd = types::Fixed(0);
        let ptr = bufs[slot][..].as_mut_ptr();
        let sqe = match step {
            Step::Read { off, len } => opcode::Read::new(fd, ptr, len as u32).offset(off).build(),
            Step::Write { off, len } => opcode::Write::new(fd, ptr, len as u32).offset(off).build(),
            Step::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the buffer lives in `bufs` until this function has reaped every SQE (it
        // returns only with nothing in flight); the ring has 64 entries and a slot has at
        // most one SQE queued, with at most 32 slots.
        unsafe { ring.submission().push(&sqe) }.expect("SQ has room");
    };
    assert!(nr_slots <= 32);
    let mut nr_in_flight = 0;
    for (slot, slot_job) in jobs.iter_mut().enumerate() {
        if let Some(job) = next(slot) {
            push(&mut ring, &mut bufs, slot, job[0]);
            *slot_job = Some((job, 1, Instant::now()));
            nr_in_flight += 1;
        }
    }
    while nr_in_flight > 0 {
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqes: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (slot, res) in cqes {
            let (job, step, start) = jobs[slot].take().expect("a job in flight");
            let want = match job[step - 1] {
                Step::Read { len, .. } | Step::Write { len, .. } => len as i32,
                Step::Fdatasync => 0,
            };
            assert_eq!(res, want, "raw {:?} failed: {res}", job[step - 1]);
            if step < job.len() {
                push(&mut ring, &mut bufs, slot, job[step]);
                jobs[slot] = Some((job, step + 1, start));
                continue;
            }
            done(slot, start.elapsed());
            match next(slot) {
                Some(job) => {
                    push(&mut ring, &mut bufs, slot, job[0]);
                    jobs[slot] = Some((job, 1, Instant::now()));
                }
                None => nr_in_flight -= 1,
            }
        }
    }
}

fn open_raw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open for raw io_uring")
}

// ---------------------------------------------------------------------------------------------
// The pool side.

fn open_engine(path: &Path) -> std::io::Result<AnyDataDevice> {
    DataDeviceOptions::new(BLOCK_SIZE)
        .engine(EngineChoice::Uring)
        .open(path)
}

/// Formats a fresh pool over the data file with `cfg`.
fn fresh_pool(files: &Files, nr_blocks: u64, cfg: PoolConfig) -> Pool {
    let _ = std::fs::remove_file(&files.meta);
    let meta: Arc<dyn MetaDevice> =
        Arc::new(FileMetaDevice::create(&files.meta, META_BLOCKS).expect("create metadata file"));
    let data = files.data.clone();
    let pool = Pool::format(meta, nr_blocks, cfg, move || open_engine(&data)).expect("format");
    pool.create_thin(1).expect("create thin 1");
    pool
}

/// Runs `qd` tasks, each taking offsets from `work` until it is empty, writing 4 KiB at each.
fn write_each(thin: &Thin, dev: &AnyDataDevice, qd: usize, work: &[u64]) -> Duration {
    let next = Cell::new(0usize);
    let start = Instant::now();
    let task = |_| async {
        let mut buf = IoBuf::filled(IO_SIZE, 0x5a);
        loop {
            let i = next.get();
            if i >= work.len() {
                return;
            }
            next.set(i + 1);
            let (r, b) = thin.write(dev, work[i], buf, false).await;
            r.expect("pool write");
            buf = b;
        }
    };
    block_on(join_all((0..qd).map(task)));
    start.elapsed()
}

/// Writes every block of `[0, nr)` in full (provisions without zeroing), then commits.
fn provision(pool: &Pool, thin: &Thin, dev: &AnyDataDevice, nr: u64) {
    let next = Cell::new(0u64);
    let task = |_| async {
        let mut buf = IoBuf::filled(BLOCK_SIZE as usize, 0xa5);
        loop {
            let v = next.get();
            if v >= nr {
                return;
            }
            next.set(v + 1);
            let (r, b) = thin.write(dev, v * BLOCK_SIZE, buf, false).await;
            r.expect("provisioning write");
            buf = b;
        }
    };
    block_on(join_all((0..32).map(task)));
    block_on(pool.commit()).expect("commit");
    pool.wait_idle();
}

/// Data blocks (device byte offsets) thin `id` maps in `[0, nr)`, by virtual block.
fn mapped(pool: &Pool, id: u32, nr: u64) -> Vec<u64> {
    let maps = pool
        .metadata()
        .mappings_in(ThinId(id), VBlock(0), VBlock(nr), usize::MAX)
        .expect("mappings");
    assert_eq!(
        maps.len() as u64,
        nr,
        "thin {id} should map all of [0, {nr})"
    );
    maps.iter().map(|(_, d)| d.0 * BLOCK_SIZE).collect()
}

fn rand_in_block(rng: &mut SmallRng) -> u64 {
    rng.gen_range(0..BLOCK_SIZE / IO_SIZE as u64) * IO_SIZE as u64
}

fn p99(mut d: Vec<Duration>) -> Duration {
    assert!(!d.is_empty(), "p99 of nothing");
    d.sort();
    let i = (d.len() * 99).div_ceil(100).max(1) - 1;
    d[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Read,
    Write,
}

/// Random reads and overwrites of a provisioned thin, then flush latency under writes.
fn provisioned(files: &Files, raw: &File, sz: &Sizes, dev: &AnyDataDevice) {
    let pool = fresh_pool(files, sz.nr_blocks, PoolConfig::default());
    let thin = pool.open_thin(1).expect("open thin");
    provision(&pool, &thin, dev, sz.nr_provisioned);
    let blocks = mapped(&pool, 1, sz.nr_provisioned);
    let nr = sz.nr_provisioned;

    let mut cases = Vec::new();
    for op in [Op::Read, Op::Write] {
        for qd in [1usize, 32] {
            for is_raw in [true, false] {
                cases.push((op, qd, is_raw));
            }
        }
    }
    let mut nr_done = vec![0u64; cases.len()];
    let mut elapsed = vec![Duration::ZERO; cases.len()];
    let slice = sz.case_time / NR_SLICES;
    for round in 0..NR_SLICES {
        for (i, &(op, qd, is_raw)) in cases.iter().enumerate() {
            let seed = u64::from(round) << 32 | i as u64;
            let start = Instant::now();
            let until = start + slice;
            nr_done[i] += if is_raw {
                let mut rng = SmallRng::seed_from_u64(seed);
                let mut n = 0;
                run_raw(
                    raw,
                    qd,
                    |_| {
                        (Instant::now() < until).then(|| {
                            let off =
                                blocks[rng.gen_range(0..blocks.len())] + rand_in_block(&mut rng);
                            let len = IO_SIZE;
                            vec![match op {
                                Op::Read => Step::Read { off, len },
                                Op::Write => Step::Write { off, len },
                            }]
                        })
                    },
                    |_, _| n += 1,
                );
                n
            } else {
                let task = |t: usize| {
                    let thin = &thin;
                    async move {
                        let mut rng = SmallRng::seed_from_u64(seed ^ (t as u64) << 16);
                        let mut buf = IoBuf::filled(IO_SIZE, 0x5a);
                        let mut n = 0u64;
                        while Instant::now() < until {
                            let off = rng.gen_range(0..nr) * BLOCK_SIZE + rand_in_block(&mut rng);
                            let (r, b) = match op {
                                Op::Read => thin.read(dev, off, buf).await,
                                Op::Write => thin.write(dev, off, buf, false).await,
                            };
                            r.expect("pool I/O");
                            buf = b;
                            n += 1;
                        }
                        n
                    }
                };
                block_on(join_all((0..qd).map(task))).into_iter().sum()
            };
            elapsed[i] += start.elapsed();
        }
    }
    let iops: Vec<f64> = (0..cases.len())
        .map(|i| nr_done[i] as f64 / elapsed[i].as_secs_f64())
        .collect();
    for (i, &(op, qd, is_raw)) in cases.iter().enumerate() {
        let op = match op {
            Op::Read => "randread",
            Op::Write => "randwrite",
        };
        let way = if is_raw { "raw" } else { "pool" };
        figure(&format!("{way}_{op}_qd{qd}_iops"), iops[i], "iops");
        if !is_raw {
            ratio(&format!("pool_{op}_qd{qd}"), iops[i] / iops[i - 1], 0.95);
        }
    }

    // Flush latency under random overwrites.
    let raw_p99 = {
        let until = Instant::now() + sz.flush_time;
        let mut rng = SmallRng::seed_from_u64(7);
        let mut lat = Vec::new();
        run_raw(
            raw,
            FLUSH_WRITERS + 1,
            |slot| {
                if Instant::now() >= until {
                    None
                } else if slot == FLUSH_WRITERS {
                    Some(vec![Step::Fdatasync])
                } else {
                    let off = blocks[rng.gen_range(0..blocks.len())] + rand_in_block(&mut rng);
                    Some(vec![Step::Write { off, len: IO_SIZE }])
                }
            },
            |slot, d| {
                if slot == FLUSH_WRITERS {
                    lat.push(d);
                }
            },
        );
        eprintln!("# raw: {} fdatasyncs", lat.len());
        p99(lat)
    };
    let ours = flush_under_writes(&thin, dev, sz.flush_time, |rng| {
        rng.gen_range(0..nr) * BLOCK_SIZE + rand_in_block(rng)
    });
    eprintln!("# pool: {} flushes", ours.len());
    let ours_p99 = p99(ours);
    figure("raw_fdatasync_p99_qd32_us", us(raw_p99), "us");
    figure("pool_flush_p99_qd32_us", us(ours_p99), "us");
    ratio(
        "pool_flush_p99_qd32",
        raw_p99.as_secs_f64() / ours_p99.as_secs_f64(),
        0.5,
    );

    // The same with first writes mixed in, so flushes commit metadata: into unprovisioned
    // blocks from `nr` on, as many as there is room for, paced evenly over the run so that
    // (nearly) every flush finds a new mapping to commit.
    let commits_before = pool.status().stats.commits;
    let max_first = sz.nr_blocks - nr - pool.status().reserve_target - 64;
    let nr_first = Cell::new(0u64);
    let start = Instant::now();
    let ours = flush_under_writes(&thin, dev, sz.flush_time, |rng| {
        let n = nr_first.get();
        let paced = start.elapsed().as_secs_f64() / sz.flush_time.as_secs_f64();
        if (n as f64) < max_first as f64 * paced && rng.gen_range(0..FIRST_WRITE_EVERY) == 0 {
            nr_first.set(n + 1);
            (nr + n) * BLOCK_SIZE + rand_in_block(rng)
        } else {
            rng.gen_range(0..nr) * BLOCK_SIZE + rand_in_block(rng)
        }
    });
    let st = pool.status().stats;
    eprintln!(
        "# pool with first writes: {} flushes, {} first writes, {} commits",
        ours.len(),
        nr_first.get(),
        st.commits - commits_before
    );
    figure("pool_flush_p99_first_writes_qd32_us", us(p99(ours)), "us");
    drop(thin);
    pool.close().expect("close");
}

/// FLUSH_WRITERS tasks writing 4 KiB at `offset(rng)` and one flushing, for `time`; returns
/// the flush latencies.
fn flush_under_writes(
    thin: &Thin,
    dev: &AnyDataDevice,
    time: Duration,
    offset: impl Fn(&mut SmallRng) -> u64,
) -> Vec<Duration> {
    let until = Instant::now() + time;
    let offset = &offset;
    let writer = |t: usize| -> Pin<Box<dyn Future<Output = Vec<Duration>> + '_>> {
        Box::pin(async move {
            let mut rng = SmallRng::seed_from_u64(t as u64 + 100);
            let mut buf = IoBuf::filled(IO_SIZE, 0x5a);
            while Instant::now() < until {
                let (r, b) = thin.write(dev, offset(&mut rng), buf, false).await;
                r.expect("pool write");
                buf = b;
            }
            Vec::new()
        })
    };
    let flusher: Pin<Box<dyn Future<Output = Vec<Duration>>>> = Box::pin(async move {
        let mut lat = Vec::new();
        while Instant::now() < until {
            let start = Instant::now();
            thin.flush(dev).await.expect("pool flush");
            lat.push(start.elapsed());
        }
        lat
    });
    let futs = (0..FLUSH_WRITERS).map(writer).chain([flusher]);
    block_on(join_all(futs)).into_iter().flatten().collect()
}

/// Makes `[off, off + len)` of the file read as zeros the way the pool zeroes a block on a
/// regular file (`fallocate(ZERO_RANGE)`: unwritten extents).
fn zero_range(file: &File, off: u64, len: u64) {
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on an fd owned by `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// Raw 4 KiB writes at `offs`, in order, `qd` at a time; returns the time taken.
fn raw_writes(raw: &File, qd: usize, offs: &[u64]) -> Duration {
    let mut it = offs.iter();
    let start = Instant::now();
    run_raw(
        raw,
        qd,
        |_| {
            it.next()
                .map(|&off| vec![Step::Write { off, len: IO_SIZE }])
        },
        |_, _| {},
    );
    start.elapsed()
}

/// 4 KiB first writes into unprovisioned blocks, with the reserve or without it.
///
/// In rounds: each round waits until the reserve is full, writes fewer blocks than it holds,
/// then (untimed) discards them and commits so the next round can reuse the space (without
/// passdown, so no holes are punched into the file).
fn first_writes(files: &Files, raw: &File, sz: &Sizes, dev: &AnyDataDevice, reserve: bool) {
    let cfg = PoolConfig {
        reserve_blocks: if reserve { sz.reserve_blocks } else { 0 },
        reserve_refill_batch: 64,
        discard_passdown: false,
        ..PoolConfig::default()
    };
    let pool = fresh_pool(files, sz.nr_blocks, cfg);
    let thin = pool.open_thin(1).expect("open thin");
    let name = if reserve { "reserve" } else { "noreserve" };
    let max_round = (sz.reserve_blocks * 3 / 4) as usize;
    for (qd, &total) in [1usize, 32].iter().zip(&sz.nr_first) {
        let (mut ours, mut raw_t, mut raw_zeroed_t) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let before = pool.status().stats;
        let mut done = 0;
        let mut rng = SmallRng::seed_from_u64(*qd as u64);
        while done < total {
            let n = max_round.min(total - done);
            pool.wait_idle();
            let mut vblocks: Vec<u64> = (0..n as u64).collect();
            vblocks.shuffle(&mut rng);
            let work: Vec<u64> = vblocks
                .iter()
                .map(|v| v * BLOCK_SIZE + rand_in_block(&mut rng))
                .collect();
            ours += write_each(&thin, dev, *qd, &work);
            // Raw: the same device positions, in the same order, at the same QD; first as
            // they are now (written), then after zeroing their blocks as the pool does.
            let blocks = mapped(&pool, 1, n as u64);
            let raw_work: Vec<u64> = work
                .iter()
                .map(|&off| blocks[(off / BLOCK_SIZE) as usize] + off % BLOCK_SIZE)
                .collect();
            raw_t += raw_writes(raw, *qd, &raw_work);
            for &b in &blocks {
                zero_range(raw, b, BLOCK_SIZE);
            }
            raw_zeroed_t += raw_writes(raw, *qd, &raw_work);
            block_on(thin.discard(dev, 0, n as u64 * BLOCK_SIZE)).expect("discard");
            block_on(pool.commit()).expect("commit");
            done += n;
        }
        let after = pool.status().stats;
        eprintln!(
            "# first writes {name} qd{qd}: {total} writes, {} from the reserve, {} zeroed \
             synchronously, {} full-block",
            after.provisions_reserve - before.provisions_reserve,
            after.provisions_sync_zero - before.provisions_sync_zero,
            after.provisions_full - before.provisions_full,
        );
        let iops = |d: Duration| total as f64 / d.as_secs_f64();
        let (ours, raw, raw_zeroed) = (iops(ours), iops(raw_t), iops(raw_zeroed_t));
        figure(&format!("raw_first_write_{name}_qd{qd}_iops"), raw, "iops");
        figure(
            &format!("raw_first_write_{name}_zeroed_qd{qd}_iops"),
            raw_zeroed,
            "iops",
        );
        figure(
            &format!("pool_first_write_{name}_qd{qd}_iops"),
            ours,
            "iops",
        );
        if reserve {
            ratio(&format!("pool_first_write_reserve_qd{qd}"), ours / raw, 0.8);
            figure(
                &format!("pool_first_write_reserve_qd{qd}_vs_raw_zeroed"),
                ours / raw_zeroed,
                "ratio",
            );
        } else {
            figure(
                &format!("pool_first_write_noreserve_qd{qd}_vs_raw"),
                ours / raw,
                "ratio",
            );
        }
    }
    drop(thin);
    pool.close().expect("close");
}

/// 4 KiB writes into shared blocks after a snapshot, against raw copy-plus-write.
///
/// In rounds: snapshot thin 1 as thin 2, break the sharing of some of its blocks, then
/// (untimed) delete the snapshot and let the background free its blocks.
fn break_sharing(files: &Files, raw: &File, sz: &Sizes, dev: &AnyDataDevice) {
    let pool = fresh_pool(files, sz.nr_blocks, PoolConfig::default());
    let thin = pool.open_thin(1).expect("open thin");
    let nr = sz.nr_provisioned / 2;
    provision(&pool, &thin, dev, nr);
    for (qd, &total) in [1usize, 32].iter().zip(&sz.nr_breaks) {
        let (mut ours, mut raw_t) = (Duration::ZERO, Duration::ZERO);
        let copies_before = pool.status().stats.copies;
        let mut rng = SmallRng::seed_from_u64(*qd as u64 + 1000);
        let mut done = 0;
        while done < total {
            let n = (nr as usize).min(total - done);
            block_on(pool.create_snap(2, 1)).expect("snapshot");
            let old = mapped(&pool, 2, nr);
            let mut vblocks: Vec<u64> = (0..n as u64).collect();
            vblocks.shuffle(&mut rng);
            let work: Vec<u64> = vblocks
                .iter()
                .map(|v| v * BLOCK_SIZE + rand_in_block(&mut rng))
                .collect();
            ours += write_each(&thin, dev, *qd, &work);
            let new = mapped(&pool, 1, nr);
            let mut it = work.iter();
            let start = Instant::now();
            run_raw(
                raw,
                *qd,
                |_| {
                    it.next().map(|&off| {
                        let v = (off / BLOCK_SIZE) as usize;
                        let len = BLOCK_SIZE as usize;
                        vec![
                            Step::Read { off: old[v], len },
                            Step::Write { off: new[v], len },
                            Step::Write {
                                off: new[v] + off % BLOCK_SIZE,
                                len: IO_SIZE,
                            },
                        ]
                    })
                },
                |_, _| {},
            );
            raw_t += start.elapsed();
            pool.delete_thin(2).expect("delete snapshot");
            block_on(pool.commit()).expect("commit");
            pool.wait_idle();
            block_on(pool.commit()).expect("commit");
            done += n;
        }
        let copies = pool.status().stats.copies - copies_before;
        eprintln!("# break sharing qd{qd}: {total} writes, {copies} copies");
        assert_eq!(
            copies, total as u64,
            "every write should have copied its block"
        );
        let iops = |d: Duration| total as f64 / d.as_secs_f64();
        let (ours, raw) = (iops(ours), iops(raw_t));
        figure(&format!("raw_copy_write_qd{qd}_iops"), raw, "iops");
        figure(&format!("pool_break_sharing_qd{qd}_iops"), ours, "iops");
        ratio(&format!("pool_break_sharing_qd{qd}"), ours / raw, 0.9);
    }
    drop(thin);
    pool.close().expect("close");
}

fn main() {
    let opts = Options::from_args();
    let sz = Sizes::new(opts.quick);
    let dir =
        std::env::var_os("POOL_BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let files = Files {
        data: dir.join(format!("ublk-thin-bench-pool-data-{}", std::process::id())),
        meta: dir.join(format!("ublk-thin-bench-pool-meta-{}", std::process::id())),
    };
    let start = Instant::now();
    drop(
        DataDeviceOptions::new(BLOCK_SIZE)
            .engine(EngineChoice::Sync)
            .create(&files.data, sz.nr_blocks, Prealloc::WriteZeroes)
            .unwrap_or_else(|e| panic!("creating {}: {e}", files.data.display())),
    );
    eprintln!(
        "# prepared {} ({} MiB, zeros written) in {:.1} s",
        files.data.display(),
        (sz.nr_blocks * BLOCK_SIZE) >> 20,
        start.elapsed().as_secs_f64()
    );
    let dev = open_engine(&files.data).expect("io_uring engine on the data file");
    let raw = open_raw(&files.data);

    // Order matters on a filesystem: the pool's zeroing makes extents unwritten, so the
    // scenarios that zero nothing run first.
    provisioned(&files, &raw, &sz, &dev);
    break_sharing(&files, &raw, &sz, &dev);
    first_writes(&files, &raw, &sz, &dev, true);
    first_writes(&files, &raw, &sz, &dev, false);
    eprintln!("# total {:.1} s", start.elapsed().as_secs_f64());
}
