//! The fuzz harnesses on seeded random inputs, on stable Rust: what CI always runs, with or
//! without nightly and cargo-fuzz.
//!
//! Inputs start from the valid blocks of the base image (every block type is there) and are
//! damaged the way a fuzzer would: byte flips, header fields set to edge values, truncation,
//! re-sealing so the damage gets past the checksum. Each case has its own seed; a failure
//! prints it, and `FUZZ_SMOKE_SEED=<seed>` replays that one case.
//! `FUZZ_SMOKE_CASES=<n>` sets the number of cases per harness (default 3000; the pool model,
//! whose cases run a whole pool each, takes at most `POOL_MODEL_CASES` of them).

use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use ublk_thin_fuzz::{
    base_image, check_metadata, decode_blocks, open_metadata, pool_model, to_block, SALTS,
};

const DEFAULT_CASES: u64 = 3000;

/// Most cases of the pool model per run (each formats, runs and reopens a pool).
const POOL_MODEL_CASES: usize = 100;

/// Values that sit on the edges of what a header field may hold.
const EDGES: [u32; 10] = [0, 1, 2, 3, 126, 127, 252, 253, 0x7fff_ffff, u32::MAX];

fn cases() -> Vec<u64> {
    if let Ok(seed) = std::env::var("FUZZ_SMOKE_SEED") {
        return vec![seed.parse().expect("FUZZ_SMOKE_SEED is a number")];
    }
    let n = std::env::var("FUZZ_SMOKE_CASES").map_or(DEFAULT_CASES, |s| {
        s.parse().expect("FUZZ_SMOKE_CASES is a number")
    });
    (0..n).collect()
}

/// Runs `harness` on the input of every case, and names the first case that panics.
fn run(name: &str, make: impl Fn(&mut SmallRng) -> Vec<u8>, harness: fn(&[u8])) {
    run_cases(name, &cases(), make, harness);
}

fn run_cases(
    name: &str,
    cases: &[u64],
    make: impl Fn(&mut SmallRng) -> Vec<u8>,
    harness: fn(&[u8]),
) {
    for &seed in cases {
        let input = make(&mut SmallRng::seed_from_u64(seed));
        if catch_unwind(AssertUnwindSafe(|| harness(&input))).is_err() {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!(
                "{name}: case FUZZ_SMOKE_SEED={seed} panicked; input ({} bytes, hex): {hex}",
                input.len()
            );
        }
    }
    println!("{name}: {} cases, no panic", cases.len());
}

/// A valid block of the base image, damaged.
fn damaged_block(rng: &mut SmallRng) -> Vec<u8> {
    let img = base_image();
    if rng.gen_ratio(1, 10) {
        // Pure noise of a random length.
        let len = rng.gen_range(0..5000);
        return (0..len).map(|_| rng.gen()).collect();
    }
    let block = img.used_blocks[rng.gen_range(0..img.used_blocks.len())] as usize;
    let start = block * block_io::META_BLOCK_SIZE;
    let mut b = to_block(&img.bytes[start..start + block_io::META_BLOCK_SIZE]);
    // Which salt it had, to re-seal after the damage.
    let salt = SALTS
        .iter()
        .find(|(s, what)| thin_metadata::format::verify(&b, block as u64, *s, what).is_ok())
        .map(|(s, _)| *s);
    damage(rng, &mut b[..]);
    if let (Some(salt), true) = (salt, rng.gen_ratio(4, 5)) {
        thin_metadata::format::seal(&mut b, salt);
    }
    let len = if rng.gen_ratio(1, 10) {
        rng.gen_range(0..b.len())
    } else {
        b.len()
    };
    b[..len].to_vec()
}

/// Flips bytes or sets 32-bit fields to edge values, mostly in headers and the first entries.
fn damage(rng: &mut SmallRng, b: &mut [u8]) {
    for _ in 0..rng.gen_range(1..4) {
        let hot = if rng.gen_ratio(3, 4) { 512 } else { b.len() };
        let off = rng.gen_range(4..hot.min(b.len()));
        if rng.gen() {
            b[off] ^= 1 << rng.gen_range(0..8);
        } else {
            let off = off & !3;
            let v = EDGES[rng.gen_range(0..EDGES.len())].wrapping_add(rng.gen_range(0..2));
            if let Some(s) = b.get_mut(off..off + 4) {
                s.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// A patch list in `open_metadata`'s input format.
fn patch_list(rng: &mut SmallRng) -> Vec<u8> {
    let mut input = Vec::new();
    for _ in 0..rng.gen_range(1..4) {
        input.push(rng.gen::<u8>());
        let off: u16 = if rng.gen_ratio(3, 4) {
            rng.gen_range(4..512) & !3
        } else {
            rng.gen_range(0..4096)
        };
        input.extend_from_slice(&off.to_le_bytes());
        let len = if rng.gen() { 4 } else { rng.gen_range(1..16) };
        let reseal = if rng.gen_ratio(4, 5) { 0x80 } else { 0 };
        input.push(len | reseal);
        if len == 4 && rng.gen() {
            input.extend_from_slice(&EDGES[rng.gen_range(0..EDGES.len())].to_le_bytes());
        } else {
            input.extend((0..len).map(|_| rng.gen::<u8>()));
        }
    }
    input
}

#[test]
fn decode_blocks_smoke() {
    run("decode_blocks", damaged_block, decode_blocks);
}

#[test]
fn open_metadata_smoke() {
    run("open_metadata", patch_list, open_metadata);
}

#[test]
fn check_metadata_smoke() {
    run("check_metadata", patch_list, check_metadata);
}

#[test]
fn undamaged_base_image_opens_and_checks_clean() {
    // An empty patch list opens the base image as it is: the harness reaches the read paths.
    let dev = std::sync::Arc::new(block_io::MemMetaDevice::from_bytes(&base_image().bytes));
    let md = thin_metadata::ThinMetadata::open(dev).expect("the base image opens");
    assert_eq!(md.thins().len(), 3);
    let report = thin_metadata::check::check(&*md.device().clone(), &Default::default());
    assert!(report.is_clean(), "the base image checks clean: {report:?}");
    open_metadata(&[]);
    check_metadata(&[]);
}

/// Random bytes of a fuzzer-sized length (libFuzzer's default limit is 4096).
fn pool_model_input(rng: &mut SmallRng) -> Vec<u8> {
    let len = rng.gen_range(0..4096);
    (0..len).map(|_| rng.gen()).collect()
}

#[test]
fn pool_model_smoke() {
    let cases: Vec<u64> = cases().into_iter().take(POOL_MODEL_CASES).collect();
    run_cases("pool_model", &cases, pool_model_input, pool_model);
}
