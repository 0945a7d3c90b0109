//! The real `thin_check` (thin-provisioning-tools) as an oracle: on the same images, it and
//! we must agree on clean versus damaged. Skipped when `/usr/sbin/thin_check` is absent.

use super::*;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

const THIN_CHECK: &str = "/usr/sbin/thin_check";

/// Runs thin_check on a copy of the image: Some((clean, output)), None when not installed.
fn thin_check(dev: &MemMetaDevice) -> Option<(bool, String)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if !Path::new(THIN_CHECK).exists() {
        eprintln!("{THIN_CHECK} not found: skipping the oracle comparison");
        return None;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ublk-thin-check-{}-{n}", std::process::id()));
    // Block by block: `to_bytes` goes byte by byte, which is slow in debug builds.
    let mut image = Vec::with_capacity(dev.nr_blocks() as usize * 4096);
    let mut raw = [0u8; 4096];
    for b in 0..dev.nr_blocks() {
        dev.read_block(b, &mut raw).unwrap();
        image.extend_from_slice(&raw);
    }
    std::fs::write(&path, image).unwrap();
    let out = Command::new(THIN_CHECK).arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[track_caller]
fn assert_agree(dev: &MemMetaDevice, case: &str) {
    let ours = check_dev(dev);
    let Some((theirs, text)) = thin_check(dev) else {
        return;
    };
    let clean = ours.is_clean();
    assert_eq!(
        clean, theirs,
        "{case}: we say clean={clean}, thin_check says clean={theirs}\n\
         ours:\n{ours}\nthin_check:\n{text}"
    );
}

/// Random workloads (snapshots, held metadata snapshots, deletes, discards): both clean.
#[test]
fn random_workloads_are_clean_for_both() {
    for seed in seeds(100..104) {
        let mut nr_commits = 0;
        workload(seed, 1200, 1500, |dev, _, _, when| {
            nr_commits += 1;
            if nr_commits % 8 == 0 {
                assert_agree(dev, when);
            }
        });
    }
}

type Damage = fn(&MemMetaDevice, &ThinMetadata);

/// Damage both thin_check 0.9.0 and we detect.
#[test]
fn damage_is_found_by_both() {
    let cases: Vec<(&str, Damage)> = vec![
        ("leaf checksum", |dev, _| {
            dev.patch(thin_leaves(dev, 1)[0].0, 1000, &[0x5a]).unwrap();
        }),
        ("keys out of order", |dev, _| {
            let (leaf, mut n) = thin_leaves(dev, 1)[0].clone();
            n.keys.swap(3, 4);
            write_node(dev, leaf, &n);
        }),
        ("misdirected node", |dev, _| {
            let (leaf, n) = thin_leaves(dev, 1)[0].clone();
            dev.patch(leaf, 0, &n.encode(leaf + 1)[..]).unwrap();
        }),
        ("underfull leaf", |dev, _| {
            let (leaf, mut n) = thin_leaves(dev, 1)[1].clone();
            n.keys.truncate(10);
            n.values.truncate(80);
            write_node(dev, leaf, &n);
        }),
        ("metadata leak", |dev, _| {
            let b = superblock(dev).metadata_sm_root.nr_blocks - 1;
            set_bitmap_count(dev, metadata_bitmaps(dev)[0].blocknr, b, 1);
        }),
        ("metadata in use but free", |dev, _| {
            set_bitmap_count(dev, metadata_bitmaps(dev)[0].blocknr, thin_root(dev, 1), 0);
        }),
        ("details tree checksum", |dev, _| {
            dev.patch(superblock(dev).device_details_root, 500, &[1])
                .unwrap();
        }),
        ("metadata bitmap checksum", |dev, _| {
            dev.patch(metadata_bitmaps(dev)[0].blocknr, 500, &[1])
                .unwrap();
        }),
        ("superblock checksum", |dev, _| {
            dev.patch(0, 100, &[1]).unwrap()
        }),
        ("held snapshot copy checksum", |dev, md| {
            let held = md.reserve_metadata_snap().unwrap();
            md.commit().unwrap();
            dev.patch(held, 100, &[1]).unwrap();
        }),
    ];
    for (name, damage) in cases {
        let (dev, md) = pool_with_thin(300);
        damage(&dev, &md);
        assert!(!check_dev(&dev).is_clean(), "{name}: we missed it");
        assert_agree(&dev, name);
    }
}

/// Damage thin_check 0.9.0 does not look for (data reference counts, `mapped_blocks`,
/// index free counts) but dm-thin depends on: we report it whatever thin_check says.
#[test]
fn damage_only_we_find() {
    let cases: Vec<(&str, Damage)> = vec![
        ("data leak", |dev, _| {
            let b = 90_000;
            let loc = data_bitmaps(dev)[(b / ENTRIES_PER_BITMAP) as usize].blocknr;
            set_bitmap_count(dev, loc, b % ENTRIES_PER_BITMAP, 1);
        }),
        ("data count too high", |dev, md| {
            set_bitmap_count(dev, data_bitmaps(dev)[0].blocknr, mapped(md, 1, 4).0, 2);
        }),
        ("data in use but free", |dev, md| {
            set_bitmap_count(dev, data_bitmaps(dev)[0].blocknr, mapped(md, 1, 4).0, 0);
        }),
        ("mapped_blocks", |dev, _| {
            let root = superblock(dev).device_details_root;
            let mut node = read_node(dev, root, 24);
            let mut d = crate::format::DeviceDetails::decode(node.value(0));
            d.mapped_blocks += 1;
            node.set_value(0, &d.encode());
            write_node(dev, root, &node);
        }),
    ];
    for (name, damage) in cases {
        let (dev, md) = pool_with_thin(300);
        damage(&dev, &md);
        let ours = check_dev(&dev);
        assert!(!ours.is_clean(), "{name}: we missed it");
        if let Some((theirs, _)) = thin_check(&dev) {
            eprintln!("{name}: thin_check 0.9.0 says clean={theirs}");
        }
    }
}
