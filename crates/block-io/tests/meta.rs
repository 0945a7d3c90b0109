//! Metadata devices against a model: round trips, coalesced writes, range errors, injected
//! faults and crash images.
//!
//! Randomized tests run fixed seeds; set `BLOCKIO_SEED=<n>` to replay one seed. Every
//! assertion in them names its seed.

use block_io::{
    os_error, CrashConfig, Fault, FaultyMetaDevice, FileMetaDevice, MemMetaDevice, MetaBlock,
    MetaDevice, META_BLOCK_SIZE,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

const SECTOR_SIZE_BYTES: usize = 512;
const NR_SECTORS: usize = META_BLOCK_SIZE / SECTOR_SIZE_BYTES;

fn seeds() -> Vec<u64> {
    match std::env::var("BLOCKIO_SEED") {
        Ok(s) => vec![s.parse().expect("BLOCKIO_SEED must be a u64")],
        Err(_) => (0..16).collect(),
    }
}

/// A unique path under the temp dir, removed on drop, so parallel tests never collide.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let file = format!("block-io-test-{}-{name}-{n}", std::process::id());
        let path = std::env::temp_dir().join(file);
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A block whose every byte depends on `tag`, so different tags differ in every sector.
fn block_of(tag: u64) -> Box<MetaBlock> {
    let mut rng = SmallRng::seed_from_u64(tag ^ 0x9e37_79b9_7f4a_7c15);
    let mut b = Box::new([0u8; META_BLOCK_SIZE]);
    rng.fill(&mut b[..]);
    // Random bytes could coincide in a whole sector only with negligible chance; stamping
    // the tag makes it impossible.
    for sector in 0..NR_SECTORS {
        let at = sector * SECTOR_SIZE_BYTES;
        b[at..at + 8].copy_from_slice(&tag.to_le_bytes());
    }
    b
}

fn read(dev: &dyn MetaDevice, block: u64) -> Box<MetaBlock> {
    let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
    dev.read_block(block, &mut buf).expect("read");
    buf
}

fn assert_matches_model(dev: &dyn MetaDevice, model: &[Box<MetaBlock>], what: &str) {
    assert_eq!(dev.nr_blocks(), model.len() as u64, "{what}: size");
    for (i, want) in model.iter().enumerate() {
        assert!(
            read(dev, i as u64)[..] == want[..],
            "{what}: block {i} differs from the model"
        );
    }
}

fn round_trip(dev: &dyn MetaDevice, what: &str) {
    let nr = dev.nr_blocks();
    let mut model: Vec<Box<MetaBlock>> = (0..nr).map(|_| Box::new([0u8; 4096])).collect();
    assert_matches_model(dev, &model, what);
    for block in [0, nr / 2, nr - 1] {
        model[block as usize] = block_of(block + 100);
        dev.write_block(block, &model[block as usize])
            .expect("write");
    }
    assert_matches_model(dev, &model, what);
    dev.flush().expect("flush");
    assert_matches_model(dev, &model, what);
}

#[test]
fn round_trips() {
    round_trip(&MemMetaDevice::new(16), "memory");
    round_trip(&FaultyMetaDevice::new(16), "faulty");
    let path = TempPath::new("round-trip");
    let dev = FileMetaDevice::create(&path.0, 16).expect("create");
    round_trip(&dev, "file");
    drop(dev);
    // What was flushed is there after reopening, as the only copy left is the file.
    let dev = FileMetaDevice::open(&path.0).expect("reopen");
    assert_eq!(read(&dev, 8)[..], block_of(108)[..]);
    assert_eq!(dev.path(), path.0.as_path());
}

#[test]
fn file_create_refuses_existing_and_open_rounds_down() {
    let path = TempPath::new("create");
    drop(FileMetaDevice::create(&path.0, 2).expect("create"));
    let err = FileMetaDevice::create(&path.0, 2).expect_err("create over an existing file");
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(
        err.to_string().contains(&path.0.display().to_string()),
        "{err}"
    );

    std::fs::write(&path.0, vec![7u8; 3 * META_BLOCK_SIZE + 100]).expect("write file");
    let dev = FileMetaDevice::open(&path.0).expect("open");
    assert_eq!(dev.nr_blocks(), 3, "a trailing partial block is ignored");
    dev.grow(5).expect("grow");
    assert_eq!(dev.nr_blocks(), 5);
    assert_eq!(read(&dev, 4)[..], [0u8; META_BLOCK_SIZE][..]);
    dev.grow(1).expect("grow never shrinks");
    assert_eq!(dev.nr_blocks(), 5);

    let missing = TempPath::new("missing");
    let err = FileMetaDevice::open(&missing.0).expect_err("open a missing file");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        os_error(&err),
        Some(libc::ENOENT),
        "the errno survives the context"
    );
    assert!(err.to_string().contains("opening metadata device"), "{err}");
}

#[test]
fn file_errors_name_block_and_path() {
    let path = TempPath::new("truncated");
    let dev = FileMetaDevice::create(&path.0, 4).expect("create");
    // Shrinking the file behind the device's back makes the read itself fail.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .and_then(|f| f.set_len(0))
        .expect("truncate");
    let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
    let err = dev
        .read_block(2, &mut buf)
        .expect_err("read past the real end");
    let msg = err.to_string();
    assert!(
        msg.contains("block 2") && msg.contains(&path.0.display().to_string()),
        "{msg}"
    );
}

/// Random batches of writes, with runs, gaps and repeated blocks, against a model.
fn write_blocks_against_model(dev: &dyn MetaDevice, seed: u64, what: &str) {
    let nr = dev.nr_blocks();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model: Vec<Box<MetaBlock>> = (0..nr).map(|b| read(dev, b)).collect();
    for batch in 0..20u64 {
        let mut writes: Vec<(u64, Box<MetaBlock>)> = Vec::new();
        for _ in 0..rng.gen_range(0..6) {
            let start = rng.gen_range(0..nr);
            let len = rng.gen_range(1..=(nr - start).min(12));
            for block in start..start + len {
                writes.push((block, block_of(rng.gen())));
            }
        }
        for (block, buf) in &writes {
            model[*block as usize] = buf.clone();
        }
        let refs: Vec<(u64, &MetaBlock)> = writes.iter().map(|(b, buf)| (*b, &**buf)).collect();
        dev.write_blocks(&refs).expect("write_blocks");
        assert_matches_model(dev, &model, &format!("{what}, seed {seed}, batch {batch}"));
    }
    dev.flush().expect("flush");
}

#[test]
fn write_blocks_matches_model() {
    for seed in seeds() {
        write_blocks_against_model(&MemMetaDevice::new(64), seed, "memory");
        write_blocks_against_model(&FaultyMetaDevice::new(64), seed, "faulty");
        let path = TempPath::new("coalesce");
        let dev = FileMetaDevice::create(&path.0, 300).expect("create");
        // 300 blocks lets one run pass the 256-block cap on a coalesced write.
        let all: Vec<(u64, Box<MetaBlock>)> = (0..300).map(|b| (b, block_of(b ^ seed))).collect();
        let refs: Vec<(u64, &MetaBlock)> = all.iter().map(|(b, buf)| (*b, &**buf)).collect();
        dev.write_blocks(&refs).expect("write_blocks");
        let model: Vec<Box<MetaBlock>> = all.into_iter().map(|(_, buf)| buf).collect();
        assert_matches_model(&dev, &model, &format!("file, seed {seed}, 300-block run"));
        write_blocks_against_model(&dev, seed, "file");
        let bytes = std::fs::read(&path.0).expect("read file");
        let reread = MemMetaDevice::from_bytes(&bytes);
        let model: Vec<Box<MetaBlock>> = (0..300).map(|b| read(&dev, b)).collect();
        assert_matches_model(&reread, &model, &format!("file bytes, seed {seed}"));
    }
}

fn out_of_range_is_an_error(dev: &dyn MetaDevice, what: &str) {
    let nr = dev.nr_blocks();
    let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
    for block in [nr, nr + 1, u64::MAX] {
        let err = dev
            .read_block(block, &mut buf)
            .expect_err("read out of range");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{what}");
        assert!(
            err.to_string().contains(&block.to_string()),
            "{what}: {err}"
        );
        dev.write_block(block, &buf)
            .expect_err("write out of range");
    }
    assert_eq!(
        dev.nr_blocks(),
        nr,
        "{what}: a bad write must not extend the device"
    );
}

#[test]
fn out_of_range_accesses_fail() {
    out_of_range_is_an_error(&MemMetaDevice::new(4), "memory");
    out_of_range_is_an_error(&FaultyMetaDevice::new(4), "faulty");
    let path = TempPath::new("range");
    let dev = FileMetaDevice::create(&path.0, 4).expect("create");
    out_of_range_is_an_error(&dev, "file");
    // A batch with one bad block writes none of them.
    let good = block_of(1);
    let err = dev
        .write_blocks(&[(0, &good), (4, &good)])
        .expect_err("batch with a bad block");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(read(&dev, 0)[..], [0u8; META_BLOCK_SIZE][..]);
    assert_eq!(
        std::fs::metadata(&path.0).expect("stat").len(),
        4 * META_BLOCK_SIZE as u64
    );
}

fn is_injected_eio(err: &std::io::Error) -> bool {
    os_error(err) == Some(libc::EIO) && err.to_string().contains("injected")
}

#[test]
fn fault_nth_write_fails_once_and_changes_nothing() {
    let dev = FaultyMetaDevice::new(8);
    dev.write_block(0, &block_of(1))
        .expect("write before the fault");
    dev.add_fault(Fault::NthWrite(3));
    dev.write_block(1, &block_of(2)).expect("1st write");
    dev.write_block(2, &block_of(3)).expect("2nd write");
    let err = dev.write_block(3, &block_of(4)).expect_err("3rd write");
    assert!(is_injected_eio(&err), "{err}");
    assert!(err.to_string().contains("block 3"), "{err}");
    assert_eq!(
        read(&dev, 3)[..],
        [0u8; META_BLOCK_SIZE][..],
        "a failed write changes nothing"
    );
    assert_eq!(dev.nr_pending_writes(), 3, "a failed write is not pending");
    assert_eq!(dev.nr_writes(), 4, "failed writes are counted");
    dev.write_block(3, &block_of(4))
        .expect("the 4th write succeeds");
    assert_eq!(read(&dev, 3)[..], block_of(4)[..]);
}

#[test]
fn fault_write_to_block_fails_every_time_until_cleared() {
    let dev = FaultyMetaDevice::new(8);
    dev.add_fault(Fault::WriteToBlock(5));
    for _ in 0..3 {
        let err = dev
            .write_block(5, &block_of(1))
            .expect_err("write to block 5");
        assert!(is_injected_eio(&err), "{err}");
        dev.write_block(4, &block_of(2))
            .expect("other blocks are fine");
    }
    // Through write_blocks too, since it is built from block writes.
    let b = block_of(3);
    dev.write_blocks(&[(5, &b)])
        .expect_err("write_blocks to block 5");
    assert_eq!(read(&dev, 5)[..], [0u8; META_BLOCK_SIZE][..]);
    dev.clear_faults();
    dev.write_block(5, &block_of(1))
        .expect("after clear_faults");
}

#[test]
fn fault_nth_flush_keeps_writes_pending() {
    let dev = FaultyMetaDevice::new(8);
    dev.add_fault(Fault::NthFlush(2));
    dev.write_block(0, &block_of(1)).expect("write");
    dev.flush().expect("1st flush");
    dev.write_block(1, &block_of(2)).expect("write");
    let err = dev.flush().expect_err("2nd flush");
    assert!(is_injected_eio(&err), "{err}");
    assert_eq!(
        dev.nr_pending_writes(),
        1,
        "a failed flush leaves its writes pending"
    );
    let durable = dev.durable_image();
    assert_eq!(read(&durable, 0)[..], block_of(1)[..]);
    assert_eq!(read(&durable, 1)[..], [0u8; META_BLOCK_SIZE][..]);
    dev.flush().expect("3rd flush");
    assert_eq!(dev.nr_pending_writes(), 0);
    assert_eq!(read(&dev.durable_image(), 1)[..], block_of(2)[..]);
    assert_eq!(dev.nr_flushes(), 3);
}

#[test]
fn fault_read_of_block() {
    let dev = FaultyMetaDevice::new(8);
    dev.add_fault(Fault::ReadOfBlock(4));
    let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
    let err = dev.read_block(4, &mut buf).expect_err("read block 4");
    assert!(is_injected_eio(&err), "{err}");
    dev.write_block(4, &block_of(1))
        .expect("writes to block 4 are fine");
    dev.read_block(4, &mut buf).expect_err("read block 4 again");
    read(&dev, 3);
    assert_eq!(dev.nr_reads(), 3);
    dev.clear_faults();
    assert_eq!(read(&dev, 4)[..], block_of(1)[..]);
}

#[test]
fn fault_after_ops_fails_everything() {
    let dev = FaultyMetaDevice::new(8);
    read(&dev, 0);
    dev.add_fault(Fault::AfterOps(3));
    dev.write_block(0, &block_of(1)).expect("op 1");
    read(&dev, 0);
    dev.flush().expect("op 3");
    let mut buf = Box::new([0u8; META_BLOCK_SIZE]);
    assert!(is_injected_eio(
        &dev.read_block(1, &mut buf).expect_err("read")
    ));
    assert!(is_injected_eio(
        &dev.write_block(1, &buf).expect_err("write")
    ));
    assert!(is_injected_eio(&dev.flush().expect_err("flush")));
    assert_eq!(
        (dev.nr_reads(), dev.nr_writes(), dev.nr_flushes()),
        (3, 2, 2)
    );
    dev.clear_faults();
    dev.write_block(1, &block_of(2))
        .expect("after clear_faults");
    let debug = format!("{dev:?}");
    assert!(
        debug.len() < 300,
        "Debug summarizes instead of dumping blocks: {debug}"
    );
}

#[test]
fn fault_device_from_image_and_grow() {
    let image = MemMetaDevice::new(3);
    image.write_block(2, &block_of(9)).expect("write");
    let dev = FaultyMetaDevice::from_image(&image);
    assert_eq!(dev.nr_blocks(), 3);
    assert_eq!(dev.nr_pending_writes(), 0);
    assert_eq!(read(&dev, 2)[..], block_of(9)[..]);
    dev.grow(5);
    dev.write_block(4, &block_of(1))
        .expect("write to a grown block");
    let crash = dev.crash_image_with(
        0,
        CrashConfig {
            keep_probability: 0.0,
            ..Default::default()
        },
    );
    assert_eq!(crash.nr_blocks(), 5, "growth is durable");
    assert_eq!(read(&crash, 2)[..], block_of(9)[..]);
}

/// Flushed blocks 0..16, then unflushed writes: each of 16..32 once and a few flushed blocks
/// overwritten twice. Returns the device and, per block, every version a sector may hold.
fn crashable(seed: u64) -> (FaultyMetaDevice, Vec<Vec<Box<MetaBlock>>>) {
    let dev = FaultyMetaDevice::new(32);
    let mut versions: Vec<Vec<Box<MetaBlock>>> =
        (0..32).map(|_| vec![Box::new([0; 4096])]).collect();
    for block in 0..16 {
        let buf = block_of(seed * 1000 + block);
        dev.write_block(block, &buf).expect("write");
        versions[block as usize] = vec![buf];
    }
    dev.flush().expect("flush");
    let overwrites = [
        16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 3, 3, 7, 7,
    ];
    for (i, block) in overwrites.into_iter().enumerate() {
        let buf = block_of(seed * 1000 + 500 + i as u64);
        dev.write_block(block, &buf).expect("write");
        versions[block as usize].push(buf);
    }
    (dev, versions)
}

#[test]
fn crash_image_properties() {
    let (mut nr_absent, mut nr_present, mut nr_torn) = (0, 0, 0);
    for seed in seeds() {
        let (dev, versions) = crashable(seed);
        for crash_seed in 0..32 {
            let image = dev.crash_image(crash_seed);
            let what = format!("seed {seed}, crash seed {crash_seed}");
            assert_eq!(image.nr_blocks(), 32, "{what}");
            for (block, candidates) in versions.iter().enumerate() {
                let got = read(&image, block as u64);
                let mut sources = Vec::new();
                for sector in 0..NR_SECTORS {
                    let range = sector * SECTOR_SIZE_BYTES..(sector + 1) * SECTOR_SIZE_BYTES;
                    let source = candidates
                        .iter()
                        .position(|c| c[range.clone()] == got[range.clone()]);
                    let source = source.unwrap_or_else(|| {
                        panic!("{what}: block {block} sector {sector} matches no write to it")
                    });
                    sources.push(source);
                }
                if (0..16).contains(&block) && ![3, 7].contains(&block) {
                    assert!(
                        sources.iter().all(|&s| s == 0),
                        "{what}: flushed block {block} lost"
                    );
                }
                if (16..32).contains(&block) {
                    match sources.iter().filter(|&&s| s == 1).count() {
                        0 => nr_absent += 1,
                        NR_SECTORS => nr_present += 1,
                        _ => nr_torn += 1,
                    }
                }
            }
        }
    }
    // The default knobs must produce every outcome, or the test above proves little.
    assert!(
        nr_absent > 0 && nr_present > 0 && nr_torn > 0,
        "{nr_absent} {nr_present} {nr_torn}"
    );
}

#[test]
fn crash_image_is_reproducible() {
    for seed in seeds() {
        let (dev, _) = crashable(seed);
        let first = dev.crash_image(seed).to_bytes();
        assert!(
            first == dev.crash_image(seed).to_bytes(),
            "seed {seed}: same seed, other image"
        );
        for other in 1..8 {
            let image = dev.crash_image(seed.wrapping_add(other)).to_bytes();
            assert!(
                first != image,
                "seeds {seed} and {seed}+{other} gave the same image"
            );
        }
    }
}

#[test]
fn crash_config_extremes() {
    let (dev, _) = crashable(1);
    let keep_all = CrashConfig {
        keep_probability: 1.0,
        tear_probability: 0.0,
    };
    let current: Vec<Box<MetaBlock>> = (0..32).map(|b| read(&dev, b)).collect();
    assert_matches_model(&dev.crash_image_with(5, keep_all), &current, "keep all");
    let keep_none = CrashConfig {
        keep_probability: 0.0,
        tear_probability: 1.0,
    };
    let nothing = dev.crash_image_with(5, keep_none).to_bytes();
    assert!(
        nothing == dev.durable_image().to_bytes(),
        "keep none is the durable image"
    );
    let nan = CrashConfig {
        keep_probability: f64::NAN,
        tear_probability: 7.0,
    };
    assert!(
        dev.crash_image_with(5, nan).to_bytes() == nothing,
        "NaN keeps nothing"
    );
}

/// Opens a block device named by `BLOCKIO_TEST_BLOCK_DEVICE` (e.g. a loop device) and
/// overwrites its first and last blocks. Opt-in because it is destructive and needs one; a
/// plain `cargo test` skips it.
#[test]
fn block_device_round_trip() {
    let Some(path) = std::env::var_os("BLOCKIO_TEST_BLOCK_DEVICE") else {
        eprintln!("skipping: set BLOCKIO_TEST_BLOCK_DEVICE to a scratch block device");
        return;
    };
    let dev = FileMetaDevice::open(&path).expect("open block device");
    let len_bytes = std::fs::read(&path).map(|b| b.len() as u64).unwrap_or(0);
    assert_eq!(
        dev.nr_blocks(),
        len_bytes / META_BLOCK_SIZE as u64,
        "BLKGETSIZE64 size"
    );
    assert!(
        dev.grow(dev.nr_blocks() + 1).is_err(),
        "a block device cannot grow"
    );
    round_trip(&dev, "block device");
}
