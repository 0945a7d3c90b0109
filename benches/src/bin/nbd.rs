//! ublk-thin's NBD export against qemu-nbd, both driven by the same fio jobs (fio's nbd
//! engine, libnbd underneath) over unix sockets, in one run on the same filesystem.
//!
//! Servers:
//! - ublk-thin: a pool on a data file (64 KiB blocks, default `PoolConfig`, metadata in a file
//!   beside it) exported by `nbd_server::Export` from this process;
//! - qemu-nbd on a raw file and on a qcow2 image (64 KiB clusters, the default), both with
//!   `--cache=none --aio=io_uring`: O_DIRECT on io_uring, as the pool's data path is, so the
//!   comparison is of the servers and not of the page cache (qemu-nbd's default writeback
//!   cache would serve reads of a region this size from memory).
//!
//! Cases (4 KiB, iodepth 32, one connection):
//! - `randread` / `randwrite`: time-based random I/O over a region that was written in full
//!   first (by the same sequential 1 MiB fio job through each server): the thin's blocks are
//!   provisioned, the raw file's extents written. Three slices per server, each slice
//!   rotating the order of the servers, so a noisy neighbour (or the tail of the previous
//!   workload) hits all alike. Goal: 0.9 of qemu-nbd raw. qemu's NBD server reads
//!   at most 16 requests of a connection at a time (`MAX_NBD_REQUESTS` in nbd/server.c),
//!   ublk-thin's up to `max_in_flight` (128 by default): a FIGURE `..._max16_iops` shows
//!   ublk-thin limited to 16 as well, to tell that apart from the servers' own speed.
//! - `firstwrite`: random 4 KiB writes into a fresh thin and a fresh qcow2 image of the same
//!   (large) virtual size, a fixed number of them, the same offsets on both sides (fio's seed
//!   is fixed); the region is large enough that about 95% of the writes land in a 64 KiB
//!   block/cluster nothing was written to before. Four slices, each on a new thin and a new
//!   image, each server first in two of them. Goal: 1.5 times qemu-nbd qcow2.
//!
//! Files: under /var/tmp (`$NBD_BENCH_DIR` to move them), removed at the end. Needs fio with
//! the nbd engine, qemu-nbd and qemu-img; without them it prints `SKIP` and succeeds.

use block_io::data::{DataDeviceOptions, Prealloc};
use block_io::{FileMetaDevice, MetaDevice};
use nbd_server::{Export, ExportConfig, Listen};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thin_pool::{Pool, PoolConfig};
use ublk_thin_benches::{figure, ratio, Options};

const BLOCK_SIZE: u64 = 64 * 1024;
const META_BLOCKS: u64 = 8192;
/// Slices of the random read and write cases (each server once first).
const NR_SLICES: usize = 3;
/// Slices of the first-write case (each server first in half of them).
const NR_FIRST_WRITE_SLICES: usize = 4;

struct Sizes {
    /// Data blocks of the pool.
    nr_blocks: u64,
    /// The written region of the randread/randwrite cases (and the raw file's size).
    provisioned_bytes: u64,
    /// Virtual size of the first-write thins and qcow2 images.
    first_write_virtual_bytes: u64,
    /// First writes per slice.
    nr_first_writes: u64,
    /// Length of one time-based slice.
    slice: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                nr_blocks: 12288,
                provisioned_bytes: 128 << 20,
                first_write_virtual_bytes: 2 << 30,
                nr_first_writes: 1500,
                slice: Duration::from_millis(500),
            }
        } else {
            Sizes {
                nr_blocks: 40960,
                provisioned_bytes: 512 << 20,
                first_write_virtual_bytes: 8 << 30,
                nr_first_writes: 6000,
                slice: Duration::from_secs(2),
            }
        }
    }
}

/// The benchmark's directory, removed (with everything in it) when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let base = std::env::var_os("NBD_BENCH_DIR").map_or("/var/tmp".into(), PathBuf::from);
        let p = base.join(format!("ublk-thin-bench-nbd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create the benchmark directory");
        Dir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-nbd process, killed when dropped.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    fn start(format: &str, file: &Path, sock: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-f", format, "--cache=none", "--aio=io_uring", "-t", "-k"])
            .arg(sock)
            .arg(file)
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd {
            child,
            uri: format!("nbd+unix:///?socket={}", sock.display()),
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs fio against `uri` with `args`; returns (read IOPS, write IOPS) from its terse output.
fn fio(uri: &str, args: &[String]) -> (f64, f64) {
    let out = Command::new("fio")
        .args(["--name=bench", "--ioengine=nbd", "--output-format=terse"])
        .arg("--terse-version=3")
        .arg(format!("--uri={uri}"))
        .args(args)
        .output()
        .expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {args:?} on {uri} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Terse v3: field 8 is read IOPS, field 49 write IOPS (1-based, `;`-separated).
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .unwrap_or_else(|| panic!("no terse line in fio's output: {text}"));
    let fields: Vec<&str> = line.split(';').collect();
    let num = |i: usize| -> f64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("fio terse field {i} missing: {line}"))
    };
    (num(7), num(48))
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Writes `bytes` from the start of the export sequentially in 1 MiB pieces.
fn fill(uri: &str, bytes: u64) {
    fio(
        uri,
        &args(&[
            "--rw=write",
            "--bs=1m",
            "--iodepth=8",
            &format!("--size={bytes}"),
        ]),
    );
}

/// A time-based 4 KiB QD32 random job over the first `bytes`; its IOPS.
fn random(uri: &str, rw: &str, bytes: u64, t: Duration) -> f64 {
    let (r, w) = fio(
        uri,
        &args(&[
            &format!("--rw={rw}"),
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={bytes}"),
            "--time_based",
            &format!("--runtime={}ms", t.as_millis()),
            "--norandommap",
            "--randrepeat=0",
        ]),
    );
    if rw == "randread" {
        r
    } else {
        w
    }
}

/// `n` random 4 KiB QD32 writes over `bytes`, each offset at most once, fixed seed; IOPS.
fn first_writes(uri: &str, bytes: u64, n: u64) -> f64 {
    fio(
        uri,
        &args(&[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={bytes}"),
            &format!("--io_size={}", n * 4096),
            "--randseed=4242",
        ]),
    )
    .1
}

fn tools_present() -> Result<(), String> {
    let nbd_engine = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("uri"));
    if !nbd_engine {
        return Err("fio with the nbd engine is not installed".into());
    }
    for tool in ["qemu-nbd", "qemu-img"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("{tool} is not installed"));
        }
    }
    Ok(())
}

/// Exports `thin` of `size` bytes on `sock`, reading at most `max_in_flight` requests of a
/// connection at a time.
fn export(
    pool: &Arc<Pool>,
    data: &Path,
    thin: u32,
    size: u64,
    sock: PathBuf,
    max_in_flight: Option<usize>,
) -> Export {
    let d = data.to_path_buf();
    let mut cfg = ExportConfig::new(pool.clone(), thin, size, Listen::Unix(sock), move || {
        DataDeviceOptions::new(BLOCK_SIZE).open(&d)
    });
    if let Some(n) = max_in_flight {
        cfg.max_in_flight = n;
    }
    Export::start(cfg).expect("start the NBD export")
}

/// Lets the tail of the previous workload (writeback below the filesystem, the device's own
/// caches) pass before the next case starts.
fn settle(t: Duration) {
    let _ = Command::new("sync").status();
    std::thread::sleep(t);
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

fn main() {
    let opts = Options::from_args();
    if let Err(why) = tools_present() {
        println!("SKIP nbd: {why}");
        return;
    }
    let sz = Sizes::new(opts.quick);
    let dir = Dir::new();
    let data = dir.path("data");
    DataDeviceOptions::new(BLOCK_SIZE)
        .create(&data, sz.nr_blocks, Prealloc::Allocate)
        .expect("create the data file");
    let meta: Arc<dyn MetaDevice> = Arc::new(
        FileMetaDevice::create(dir.path("meta"), META_BLOCKS).expect("create the metadata file"),
    );
    let d = data.clone();
    let pool = Pool::format(meta, sz.nr_blocks, PoolConfig::default(), move || {
        DataDeviceOptions::new(BLOCK_SIZE).open(&d)
    })
    .expect("format the pool");
    pool.create_thin(1).expect("create thin 1");
    let pool = Arc::new(pool);
    println!(
        "pool: {} blocks of {} KiB on {}; provisioned region {} MiB; first writes: {} per \
         slice over {} GiB, {} slices; {} slices of {:?} for random reads and writes",
        sz.nr_blocks,
        BLOCK_SIZE >> 10,
        dir.0.display(),
        sz.provisioned_bytes >> 20,
        sz.nr_first_writes,
        sz.first_write_virtual_bytes >> 30,
        NR_FIRST_WRITE_SLICES,
        NR_SLICES,
        sz.slice
    );

    // Provisioned: thin 1 and the raw file, each written in full through its own server.
    let thin = export(
        &pool,
        &data,
        1,
        sz.provisioned_bytes,
        dir.path("thin.sock"),
        None,
    );
    let ours = thin.uri();
    let thin16 = export(
        &pool,
        &data,
        1,
        sz.provisioned_bytes,
        dir.path("thin16.sock"),
        Some(16),
    );
    let thin16_uri = thin16.uri();
    fill(&ours, sz.provisioned_bytes);
    pool.wait_idle();
    let raw_file = dir.path("raw");
    std::fs::File::create(&raw_file)
        .and_then(|f| f.set_len(sz.provisioned_bytes))
        .expect("create the raw file");
    let raw = QemuNbd::start("raw", &raw_file, &dir.path("raw.sock"));
    fill(&raw.uri, sz.provisioned_bytes);

    let mut results = Vec::new();
    for rw in ["randread", "randwrite"] {
        settle(sz.slice);
        // Each slice runs the three servers in a rotated order, so none always goes first
        // (the first after a change of workload tends to pay for the previous one).
        let uris = [ours.as_str(), raw.uri.as_str(), thin16_uri.as_str()];
        let mut iops: [Vec<f64>; 3] = Default::default();
        for s in 0..NR_SLICES {
            for k in 0..uris.len() {
                let i = (s + k) % uris.len();
                iops[i].push(random(uris[i], rw, sz.provisioned_bytes, sz.slice));
            }
        }
        let [a, b, c] = iops;
        println!(
            "{rw}: ublk-thin slices {a:.0?}, qemu-nbd raw slices {b:.0?}, ublk-thin with 16 \
             in flight {c:.0?}"
        );
        let n = NR_SLICES as f64;
        let (a, b, c) = (sum(&a) / n, sum(&b) / n, sum(&c) / n);
        figure(&format!("nbd_thin_{rw}_qd32_iops"), a, "iops");
        figure(&format!("nbd_qemu_raw_{rw}_qd32_iops"), b, "iops");
        figure(&format!("nbd_thin_{rw}_qd32_max16_iops"), c, "iops");
        results.push((rw, a / b));
    }
    drop(raw);
    thin.stop();
    thin16.stop();
    let _ = std::fs::remove_file(&raw_file);

    // First writes: each slice a fresh thin and a fresh qcow2 image, ublk-thin first in even
    // slices and qemu-nbd first in odd ones.
    let ours_first_writes = |s: usize| {
        let id = 2 + s as u32;
        pool.create_thin(id).expect("create a fresh thin");
        pool.wait_idle();
        let fresh = export(
            &pool,
            &data,
            id,
            sz.first_write_virtual_bytes,
            dir.path(&format!("fw{s}.sock")),
            None,
        );
        let iops = first_writes(
            &fresh.uri(),
            sz.first_write_virtual_bytes,
            sz.nr_first_writes,
        );
        fresh.stop();
        // The pool's refill of its reserve must not overlap qemu's slice.
        pool.wait_idle();
        iops
    };
    let qcow2_first_writes = |s: usize| {
        let img = dir.path(&format!("fw{s}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg(sz.first_write_virtual_bytes.to_string())
            .output()
            .expect("run qemu-img");
        assert!(out.status.success(), "qemu-img create failed: {out:?}");
        let qcow2 = QemuNbd::start("qcow2", &img, &dir.path(&format!("q{s}.sock")));
        let iops = first_writes(&qcow2.uri, sz.first_write_virtual_bytes, sz.nr_first_writes);
        drop(qcow2);
        let _ = std::fs::remove_file(&img);
        iops
    };
    settle(sz.slice);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for s in 0..NR_FIRST_WRITE_SLICES {
        if s % 2 == 0 {
            a.push(ours_first_writes(s));
            b.push(qcow2_first_writes(s));
        } else {
            b.push(qcow2_first_writes(s));
            a.push(ours_first_writes(s));
        }
    }
    println!("first writes: ublk-thin slices {a:.0?}, qemu-nbd qcow2 slices {b:.0?}");
    let st = pool.status();
    println!(
        "pool after the run: {} of {} blocks used, {} commits",
        st.used_data_blocks, st.nr_data_blocks, st.stats.commits
    );
    let n = NR_FIRST_WRITE_SLICES as f64;
    let (a, b) = (sum(&a) / n, sum(&b) / n);
    figure("nbd_thin_firstwrite_qd32_iops", a, "iops");
    figure("nbd_qemu_qcow2_firstwrite_qd32_iops", b, "iops");

    for (rw, r) in results {
        ratio(&format!("nbd_{rw}_vs_qemu_raw"), r, 0.9);
    }
    ratio("nbd_firstwrite_vs_qemu_qcow2", a / b, 1.5);
}
