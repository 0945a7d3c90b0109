//! No input makes the checker panic or hang: random damage to a real image (mostly resealed
//! with the right checksum, so that it gets past the checksums into the decoders), a device
//! shorter than the metadata says, and absurd sizes in the superblock.

use super::*;
use crate::format::{seal, BITMAP_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, SUPERBLOCK_CSUM_XOR};

type Image = Vec<[u8; 4096]>;

fn image_of(dev: &MemMetaDevice) -> Image {
    (0..dev.nr_blocks())
        .map(|b| {
            let mut raw = [0u8; 4096];
            dev.read_block(b, &mut raw).unwrap();
            raw
        })
        .collect()
}

fn device_of(image: &Image) -> MemMetaDevice {
    let dev = MemMetaDevice::new(image.len() as u64);
    for (b, raw) in image.iter().enumerate() {
        dev.write_block(b as u64, raw).unwrap();
    }
    dev
}

/// A small pool with snapshots, shared and unshared leaves, and a held metadata snapshot.
fn busy_image(rng: &mut SmallRng) -> Image {
    let (dev, md) = new_pool(1024, 20_000);
    let mut model = Model::new();
    for _ in 0..600 {
        random_op(&md, &mut model, rng, 800);
    }
    md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    for _ in 0..200 {
        random_op(&md, &mut model, rng, 800);
    }
    md.commit().unwrap();
    assert_clean(&check_dev(&dev), "busy image");
    image_of(&dev)
}

/// The salt the block's stored checksum was made with, if any.
fn salt_of(raw: &[u8; 4096]) -> Option<u32> {
    let stored = u32::from_le_bytes(raw[..4].try_into().unwrap());
    [
        SUPERBLOCK_CSUM_XOR,
        BTREE_CSUM_XOR,
        INDEX_CSUM_XOR,
        BITMAP_CSUM_XOR,
    ]
    .into_iter()
    .find(|&salt| crate::format::block_checksum(raw, salt) == stored)
}

/// A value likely to hit an edge: zero, one, the largest, or something random.
fn edgy(rng: &mut SmallRng) -> u64 {
    match rng.gen_range(0..6) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::from(u32::MAX),
        4 => rng.gen_range(0..2048),
        _ => rng.gen(),
    }
}

fn damage(image: &mut Image, used: &[usize], rng: &mut SmallRng) {
    let b = used[rng.gen_range(0..used.len())];
    let raw = &mut image[b];
    let salt = salt_of(raw);
    match rng.gen_range(0..4) {
        // A header field of a node (flags, blocknr, nr_entries, max_entries, value_size).
        0 => {
            let at = [4, 8, 16, 20, 24][rng.gen_range(0..5)];
            let v = edgy(rng).to_le_bytes();
            let len = if at == 8 { 8 } else { 4 };
            raw[at..at + len].copy_from_slice(&v[..len]);
        }
        // A key or value word.
        1 => {
            let at = 32 + 8 * rng.gen_range(0..500);
            raw[at..at + 8].copy_from_slice(&edgy(rng).to_le_bytes());
        }
        // A few random bytes anywhere.
        2 => {
            for _ in 0..rng.gen_range(1..8) {
                raw[rng.gen_range(0..4096)] = rng.gen();
            }
        }
        // A whole block of another one, in place (a misdirected or stale write).
        _ => {
            let other = image[used[rng.gen_range(0..used.len())]];
            image[b] = other;
            return;
        }
    }
    if let Some(salt) = salt.filter(|_| rng.gen_bool(0.8)) {
        seal(raw, salt);
    }
}

#[test]
fn random_damage_never_panics() {
    for seed in seeds(0..3) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let image = busy_image(&mut rng);
        let used: Vec<usize> = (0..image.len())
            .filter(|&b| image[b] != [0u8; 4096])
            .collect();
        for round in 0..150 {
            let mut damaged = image.clone();
            for _ in 0..rng.gen_range(1..4) {
                damage(&mut damaged, &used, &mut rng);
            }
            let dev = device_of(&damaged);
            let opts = CheckOptions {
                skip_mappings: rng.gen_bool(0.2),
                progress: None,
            };
            let r = check(&dev, &opts);
            // Deterministic: the same image gives the same report.
            if round % 10 == 0 {
                assert_eq!(
                    check(&dev, &opts).problems,
                    r.problems,
                    "seed {seed} round {round}"
                );
            }
        }
    }
}

#[test]
fn short_device_and_absurd_sizes() {
    let (dev, _md) = pool_with_thin(500);
    let image = image_of(&dev);
    // The device ends before the metadata's last used block.
    let short = device_of(&image[..12].to_vec());
    let r = check_dev(&short);
    assert!(r.of_kind(ProblemKind::Superblock).count() > 0, "{r}");
    assert!(!r.is_clean());
    // Sizes no device has, with a valid checksum.
    let mut sb = superblock(&dev);
    sb.data_sm_root.nr_blocks = u64::MAX;
    sb.metadata_sm_root.nr_blocks = u64::MAX;
    sb.metadata_nr_blocks = u64::MAX;
    sb.held_root = u64::MAX;
    dev.patch(0, 0, &sb.encode(0)[..]).unwrap();
    let r = check_dev(&dev);
    assert!(r.of_kind(ProblemKind::Superblock).count() >= 3, "{r}");
    expect_at(&r, ProblemKind::OutOfRange, 0);
    // Every root pointing at the superblock itself.
    sb.data_mapping_root = 0;
    sb.device_details_root = 0;
    sb.data_sm_root.bitmap_root = 0;
    sb.metadata_sm_root.ref_count_root = 0;
    sb.held_root = 0;
    dev.patch(0, 0, &sb.encode(0)[..]).unwrap();
    let r = check_dev(&dev);
    assert!(r.of_kind(ProblemKind::OutOfRange).count() >= 4, "{r}");
}
