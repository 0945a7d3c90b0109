//! Metadata benchmark: the costs the remap engine pays per I/O and per commit.
//!
//! One thin with 1,000,000 mappings (`--quick`: 100,000), filled in sequential and in random
//! order on a memory device. Prints:
//! - `metadata_insert_seq`, `metadata_insert_random`: inserts/s into a fresh thin (the data
//!   blocks are allocated beforehand, untimed; no commit inside the timed loop);
//! - `metadata_bytes_per_mapping_seq`, `..._random`: metadata blocks in use after the commit,
//!   times 4096, over the number of mappings. dm-thin measures about 19.1; the goal is < 20;
//! - `metadata_lookup`, `metadata_lookup_2threads`: lookups/s of random mapped blocks from a
//!   warm cache, on one thread and on two at once;
//! - `metadata_commit_dirty_leaves_<n>` for n = 1, 100, 10,000 (`--quick`: 1,000): the time
//!   of the commit call alone, on a file device so fdatasync is real, after overwriting n
//!   mappings that lie in n distinct leaves; `..._blocks` says how many blocks that commit
//!   wrote (nodes, space maps and the superblock). Median of a few repetitions, each on
//!   other leaves.

use block_io::{FileMetaDevice, MemMetaDevice, MetaBlock, MetaDevice};
use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thin_metadata::format::{max_entries, META_BLOCK_SIZE};
use thin_metadata::{DataBlock, FormatOptions, ThinId, ThinMetadata, VBlock};
use ublk_thin_benches::{figure, median, rate, timed, Options, TempPath};

/// Every random choice comes from this seed, so runs differ only by the machine.
const SEED: u64 = 1;
const THIN: ThinId = ThinId(0);
/// 64 KiB data blocks, dm-thin's common choice (it does not change metadata costs).
const DATA_BLOCK_SIZE_SECTORS: u32 = 128;
/// 64 MiB of metadata: room for 1M mappings with plenty to spare.
const MEM_META_BLOCKS: u64 = 16 * 1024;
/// Entries of a full mapping leaf: overwrites this far apart always land in distinct leaves,
/// because a leaf holds at most this many consecutive keys of a densely mapped thin.
const LEAF_ENTRIES: u64 = max_entries(8) as u64;

fn main() {
    let opts = Options::from_args();
    let nr_mappings: u64 = if opts.quick { 100_000 } else { 1_000_000 };
    println!("# metadata: {nr_mappings} mappings in one thin");

    drop(fill(nr_mappings, false));
    let pool = fill(nr_mappings, true);
    lookups(&pool, if opts.quick { 200_000 } else { 2_000_000 });
    drop(pool);

    let max_dirty: u64 = if opts.quick { 1_000 } else { 10_000 };
    commits(&[(1, 9), (100, 5), (max_dirty, 3)]);
}

fn format_pool(dev: Arc<dyn MetaDevice>, nr_data_blocks: u64) -> ThinMetadata {
    let md = ThinMetadata::format(
        dev,
        FormatOptions {
            data_block_size_sectors: DATA_BLOCK_SIZE_SECTORS,
            nr_data_blocks,
        },
    )
    .expect("format the benchmark pool");
    md.create_thin(THIN).expect("create the thin");
    md.commit().expect("commit the empty thin");
    md
}

fn alloc(md: &ThinMetadata, n: u64) -> Vec<DataBlock> {
    (0..n)
        .map(|_| md.alloc_data_block().expect("allocate a data block"))
        .collect()
}

/// Maps `0..n` in sequential or random order into a fresh thin on a memory device, prints the
/// insert rate and the metadata used per mapping, and returns the committed pool.
fn fill(n: u64, random: bool) -> Filled {
    let order = if random { "random" } else { "seq" };
    let dev = Counting::new(MemMetaDevice::new(MEM_META_BLOCKS));
    let md = format_pool(dev.clone(), n);
    let mut keys: Vec<u64> = (0..n).collect();
    if random {
        keys.shuffle(&mut SmallRng::seed_from_u64(SEED));
    }
    let blocks = alloc(&md, n);
    let ((), took) = timed(|| {
        for (&v, &db) in keys.iter().zip(&blocks) {
            md.insert(THIN, VBlock(v), db).expect("insert a mapping");
        }
    });
    figure(&format!("metadata_insert_{order}"), rate(n, took), "ops/s");
    let ((), commit) = timed(|| md.commit().expect("commit the filled thin"));
    println!(
        "# {order} fill: {n} inserts in {:.2} s, commit (memory device) {:.1} ms",
        took.as_secs_f64(),
        commit.as_secs_f64() * 1e3
    );
    let s = md.status();
    let used = s.nr_metadata_blocks - s.nr_free_metadata_blocks;
    let per_mapping = (used * META_BLOCK_SIZE as u64) as f64 / n as f64;
    figure(
        &format!("metadata_bytes_per_mapping_{order}"),
        per_mapping,
        "bytes",
    );
    Filled { md, keys, dev }
}

/// A committed pool with one filled thin.
struct Filled {
    md: ThinMetadata,
    /// The mapped blocks, in insertion order.
    keys: Vec<u64>,
    dev: Arc<Counting<MemMetaDevice>>,
}

/// Random lookups of mapped blocks once every node is cached.
fn lookups(pool: &Filled, n: usize) {
    let (md, keys) = (&pool.md, &pool.keys);
    md.set_cache_capacity(MEM_META_BLOCKS as usize);
    for &v in keys {
        md.lookup(THIN, VBlock(v)).expect("warm-up lookup");
    }
    let mut rng = SmallRng::seed_from_u64(SEED);
    let probes: Vec<u64> = (0..n)
        .map(|_| rng.gen_range(0..keys.len() as u64))
        .collect();
    let run = |probes: &[u64]| {
        for &v in probes {
            let r = md.lookup(THIN, VBlock(v)).expect("lookup");
            std::hint::black_box(r);
        }
    };
    let reads_before = pool.dev.read.load(Ordering::Relaxed);
    let ((), took) = timed(|| run(&probes));
    figure("metadata_lookup", rate(n as u64, took), "ops/s");
    let ((), took) = timed(|| {
        std::thread::scope(|s| {
            for half in probes.chunks(n.div_ceil(2)) {
                s.spawn(|| run(half));
            }
        })
    });
    figure("metadata_lookup_2threads", rate(n as u64, took), "ops/s");
    let reads = pool.dev.read.load(Ordering::Relaxed) - reads_before;
    println!(
        "# {} lookups read {reads} blocks from the device (0 when warm)",
        2 * n
    );
}

/// Commit latency on a real file for each `(dirty leaves, repetitions)`.
fn commits(plan: &[(u64, u64)]) {
    let max_dirty = plan.iter().map(|p| p.0).max().unwrap_or(1);
    let max_reps = plan.iter().map(|p| p.1).max().unwrap_or(1);
    // Enough mappings that `max_dirty` keys spaced a leaf apart stay inside the mapped range,
    // with room to shift them by each repetition.
    let nr_mappings = LEAF_ENTRIES * max_dirty + max_reps;
    let overwrites: u64 = plan.iter().map(|(n, reps)| n * reps).sum();
    let file = TempPath::new("metadata");
    // Sparse: only what the pool writes takes disk space (about 20 bytes a mapping).
    let dev = Counting::new(
        FileMetaDevice::create(file.path(), 8 * MEM_META_BLOCKS).expect("create the metadata file"),
    );
    let md = format_pool(dev.clone(), nr_mappings + overwrites);
    let blocks = alloc(&md, nr_mappings);
    for (v, db) in blocks.into_iter().enumerate() {
        md.insert(THIN, VBlock(v as u64), db)
            .expect("insert a mapping");
    }
    let ((), took) = timed(|| md.commit().expect("commit the filled thin"));
    println!(
        "# commit test: {nr_mappings} mappings on {}, first commit {:.0} ms",
        file.path().display(),
        took.as_secs_f64() * 1e3
    );
    for &(n, reps) in plan {
        let mut times: Vec<Duration> = Vec::new();
        let mut written = Vec::new();
        for r in 0..reps {
            let blocks = alloc(&md, n);
            for (i, db) in blocks.into_iter().enumerate() {
                let v = i as u64 * LEAF_ENTRIES + r;
                md.insert(THIN, VBlock(v), db).expect("overwrite a mapping");
            }
            let before = dev.written.load(Ordering::Relaxed);
            let ((), took) = timed(|| md.commit().expect("commit"));
            times.push(took);
            written.push(dev.written.load(Ordering::Relaxed) - before);
        }
        let ms = median(times).as_secs_f64() * 1e3;
        figure(&format!("metadata_commit_dirty_leaves_{n}"), ms, "ms");
        written.sort_unstable();
        figure(
            &format!("metadata_commit_dirty_leaves_{n}_blocks"),
            written[written.len() / 2] as f64,
            "blocks",
        );
    }
}

/// A device that counts the blocks read and written through it, to say what an operation
/// cost in I/O.
#[derive(Debug)]
struct Counting<D> {
    inner: D,
    read: AtomicU64,
    written: AtomicU64,
}

impl<D> Counting<D> {
    fn new(inner: D) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }
}

impl<D: MetaDevice> MetaDevice for Counting<D> {
    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        self.read.fetch_add(1, Ordering::Relaxed);
        self.inner.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        self.written.fetch_add(1, Ordering::Relaxed);
        self.inner.write_block(block, buf)
    }

    fn write_blocks(&self, blocks: &[(u64, &MetaBlock)]) -> io::Result<()> {
        self.written
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        // The file device's own coalescing, so the timing is the real device's.
        self.inner.write_blocks(blocks)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}
