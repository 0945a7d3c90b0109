//! block-io's data path against io_uring written by hand, on the same file in the same run.
//!
//! 4 KiB random reads and writes at queue depth 1 and 32 on a fully written (so no hole or
//! unwritten-extent shortcuts) O_DIRECT file under /var/tmp (`$DATA_IO_DIR` to move it):
//! 1 GiB, or 256 MiB with `--quick`. The file is kept between runs, since writing it is most
//! of a quick run's time. Three ways to do the same I/O:
//! - `raw`: an io_uring of its own with the file registered, QD SQEs kept in flight;
//! - `engine`: `UringDataDevice` on block-io's standalone ring, QD concurrent tasks under
//!   `block_on`/`join_all`, each awaiting one read or write at a time;
//! - `sync`: the synchronous fallback (pread/pwrite on its default 4-thread pool), so the
//!   price of falling back is visible.
//!
//! Each case runs 3 s (`--quick`: 1 s), split into three slices interleaved round-robin with
//! the other cases, so a noisy neighbour on this shared VM hits every case alike.
//!
//! Lines: `FIGURE name=<way>_<op>_qd<n>_iops`, `RATIO name=engine_<op>_qd<n>` (engine/raw,
//! goal 0.95) and `FIGURE name=sync_<op>_qd<n>_vs_raw unit=ratio` (sync/raw). The fallback
//! has no goal: it exists for machines without io_uring, and the figure shows what falling
//! back costs (little at QD1, where a thread handoff is small next to the device; much at
//! QD32, where four threads cannot keep 32 I/Os in flight, which is the point of io_uring).

use block_io::data::rt::{block_on, join_all};
use block_io::data::{
    AnyDataDevice, DataBlock, DataDevice, DataDeviceOptions, DirectIo, EngineChoice, IoBuf, Limits,
    Prealloc, SyncMode,
};
use io_uring::{opcode, types, IoUring};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ublk_thin_benches::{figure, ratio, Options};

const IO_SIZE: usize = 4096;
const BLOCK_SIZE: u64 = 64 * 1024;
const NR_SLICES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Raw,
    Engine,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    RandRead,
    RandWrite,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::RandRead => "randread",
            Op::RandWrite => "randwrite",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    way: Way,
    op: Op,
    qd: usize,
}

impl Case {
    fn name(&self) -> String {
        let way = match self.way {
            Way::Raw => "raw",
            Way::Engine => "engine",
            Way::Sync => "sync",
        };
        format!("{way}_{}_qd{}", self.op.name(), self.qd)
    }
}

/// A random 4 KiB-aligned offset in `len_bytes`.
fn offset(rng: &mut SmallRng, len_bytes: u64) -> u64 {
    rng.gen_range(0..len_bytes / IO_SIZE as u64) * IO_SIZE as u64
}

/// The test file, created (fully written, then renamed into place) if missing.
fn prepare(len_bytes: u64) -> PathBuf {
    let dir =
        std::env::var_os("DATA_IO_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let path = dir.join(format!("ublk-thin-data-io-{}m.img", len_bytes >> 20));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == len_bytes) {
        return path;
    }
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let start = Instant::now();
    let dev = DataDeviceOptions::new(BLOCK_SIZE)
        .engine(EngineChoice::Sync)
        .create(&partial, len_bytes / BLOCK_SIZE, Prealloc::WriteZeroes)
        .unwrap_or_else(|e| panic!("creating {}: {e}", partial.display()));
    drop(dev);
    std::fs::rename(&partial, &path).expect("rename the prepared file");
    eprintln!(
        "prepared {} ({} MiB, written) in {:.1} s",
        path.display(),
        len_bytes >> 20,
        start.elapsed().as_secs_f64()
    );
    path
}

/// io_uring by hand: QD SQEs in flight on a registered O_DIRECT fd until `until`.
fn run_raw(path: &Path, op: Op, qd: usize, len_bytes: u64, until: Instant, seed: u64) -> u64 {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open for raw io_uring");
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(64)
        .expect("raw io_uring");
    ring.submitter()
        .register_files(&[file.as_raw_fd()])
        .expect("register file");
    let mut bufs: Vec<IoBuf> = (0..qd).map(|_| IoBuf::filled(IO_SIZE, 0x5a)).collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut push = |ring: &mut IoUring, slot: usize, rng: &mut SmallRng| {
        let ptr = bufs[slot][..].as_mut_ptr();
        let off = offset(rng, len_bytes);
        let fd = types::Fixed(0);
        let sqe = match op {
            Op::RandRead => opcode::Read::new(fd, ptr, IO_SIZE as u32)
                .offset(off)
                .build(),
            Op::RandWrite => opcode::Write::new(fd, ptr, IO_SIZE as u32)
                .offset(off)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the buffer lives in `bufs` until the loop below has reaped every SQE; the
        // ring has 64 entries and at most `qd` <= 32 are queued.
        unsafe { ring.submission().push(&sqe) }.expect("SQ has room");
    };
    for slot in 0..qd {
        push(&mut ring, slot, &mut rng);
    }
    let mut nr_done = 0u64;
    let mut nr_in_flight = qd;
    let mut stopping = false;
    while nr_in_flight > 0 {
        ring.submit_and_wait(1).expect("io_uring_enter");
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        if !stopping && Instant::now() >= until {
            stopping = true;
        }
        for (slot, res) in done {
            assert_eq!(res, IO_SIZE as i32, "raw {op:?} failed: {res}");
            nr_done += 1;
            if stopping {
                nr_in_flight -= 1;
            } else {
                push(&mut ring, slot, &mut rng);
            }
        }
    }
    nr_done
}

/// QD tasks, each doing one I/O at a time through `dev`, until `until`.
fn run_device(
    dev: &AnyDataDevice,
    op: Op,
    qd: usize,
    len_bytes: u64,
    until: Instant,
    seed: u64,
) -> u64 {
    let task = |i: usize| async move {
        let mut rng = SmallRng::seed_from_u64(seed ^ i as u64);
        let mut buf = IoBuf::filled(IO_SIZE, 0x5a);
        let mut nr_done = 0u64;
        while Instant::now() < until {
            let off = offset(&mut rng, len_bytes);
            let (block, in_block) = (DataBlock(off / BLOCK_SIZE), off % BLOCK_SIZE);
            let (res, b) = match op {
                Op::RandRead => dev.read(block, in_block, buf).await,
                Op::RandWrite => dev.write(block, in_block, buf).await,
            };
            res.unwrap_or_else(|e| panic!("{op:?} failed: {e}"));
            buf = b;
            nr_done += 1;
        }
        nr_done
    };
    block_on(join_all((0..qd).map(task))).into_iter().sum()
}

fn main() {
    let opts = Options::from_args();
    let len_bytes: u64 = if opts.quick { 256 << 20 } else { 1 << 30 };
    let case_time = Duration::from_secs(if opts.quick { 1 } else { 3 });
    let path = prepare(len_bytes);

    let open = |engine: EngineChoice| {
        DataDeviceOptions::new(BLOCK_SIZE)
            .engine(engine)
            .direct(DirectIo::On)
            .sync_mode(SyncMode::default())
            .limits(Limits::default())
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    };
    let engine = open(EngineChoice::Uring);
    let sync = open(EngineChoice::Sync);

    let mut cases = Vec::new();
    for op in [Op::RandRead, Op::RandWrite] {
        for qd in [1, 32] {
            for way in [Way::Raw, Way::Engine, Way::Sync] {
                cases.push(Case { way, op, qd });
            }
        }
    }
    let mut nr_done = vec![0u64; cases.len()];
    let mut elapsed = vec![Duration::ZERO; cases.len()];
    let slice = case_time / NR_SLICES;
    for round in 0..NR_SLICES {
        for (i, case) in cases.iter().enumerate() {
            let seed = u64::from(round) << 32 | i as u64;
            let start = Instant::now();
            let until = start + slice;
            nr_done[i] += match case.way {
                Way::Raw => run_raw(&path, case.op, case.qd, len_bytes, until, seed),
                Way::Engine => run_device(&engine, case.op, case.qd, len_bytes, until, seed),
                Way::Sync => run_device(&sync, case.op, case.qd, len_bytes, until, seed),
            };
            elapsed[i] += start.elapsed();
        }
    }

    let iops: Vec<f64> = (0..cases.len())
        .map(|i| nr_done[i] as f64 / elapsed[i].as_secs_f64())
        .collect();
    for (case, iops) in cases.iter().zip(&iops) {
        figure(&format!("{}_iops", case.name()), *iops, "iops");
    }
    for (i, case) in cases.iter().enumerate() {
        let raw = cases
            .iter()
            .position(|c| c.way == Way::Raw && c.op == case.op && c.qd == case.qd)
            .map(|r| iops[r])
            .unwrap_or(f64::NAN);
        let name = format!("{}_{}_qd{}", "", case.op.name(), case.qd);
        match case.way {
            Way::Raw => {}
            Way::Engine => ratio(&format!("engine{name}"), iops[i] / raw, 0.95),
            Way::Sync => figure(&format!("sync{name}_vs_raw"), iops[i] / raw, "ratio"),
        }
    }
}
