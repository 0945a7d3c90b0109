//! thin-metadata's XML dump and restore against thin-provisioning-tools 0.9.
//!
//! - `thin_metadata::xml::dump` writes exactly what `thin_dump` writes (and with `-m`,
//!   `--skip-mappings`, `--dev-id`) on metadata we wrote in random workloads (snapshots,
//!   shared blocks, deleted thins, held snapshots, trees of three levels), and on metadata
//!   thin_restore wrote (another writer's node layout and space maps);
//! - `thin_restore` of our dump passes `thin_check` and dumps back to the same XML;
//! - our restore of `thin_dump`'s output passes `thin_check` and our check, and thin_dump
//!   of it is the input again; for generated XML our restore and thin_restore give
//!   metadata that thin_dump lists identically;
//! - malformed XML is refused, naming the line, and leaves the device as it was.
//!
//! Without the tools these tests print why they skip; `REQUIRE_ORACLES=1` makes that a
//! failure. Seeds: `XML_SEED=<n>` replays one, `XML_SEEDS=<n>` runs 0..n.

use block_io::{FileMetaDevice, MemMetaDevice, MetaDevice};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use thin_metadata::xml::{dump, restore, DumpOptions};
use thin_metadata::{Error, FormatOptions, ThinId, ThinMetadata, VBlock, MAX_THIN_ID};
use ublk_thin_tests::model::{Config, Workload};
use ublk_thin_tests::oracle::{our_check, write_image, Tools};
use ublk_thin_tests::scratch::ScratchDir;
use ublk_thin_tests::seeds::for_each_seed;

/// Metadata device size for the workloads: 16 MiB.
const NR_META_BLOCKS: u64 = 4096;

fn our_dump(dev: &dyn MetaDevice, opts: &DumpOptions) -> String {
    let mut out = Vec::new();
    dump(dev, &mut out, opts).unwrap_or_else(|e| panic!("our dump: {e}"));
    String::from_utf8(out).expect("our dump is UTF-8")
}

/// `thin_dump <args> <file>`.
fn thin_dump(tools: &Tools, file: &Path, args: &[&str]) -> String {
    let out = Command::new(&tools.thin_dump)
        .args(args)
        .arg(file)
        .output()
        .expect("running thin_dump");
    assert!(
        out.status.success(),
        "thin_dump {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("thin_dump writes UTF-8")
}

/// Panics with the first differing line when `ours` is not byte for byte `theirs`.
#[track_caller]
fn assert_same_xml(ours: &str, theirs: &str, what: &str) {
    if ours == theirs {
        return;
    }
    let (o, t): (Vec<&str>, Vec<&str>) = (ours.lines().collect(), theirs.lines().collect());
    let i = o
        .iter()
        .zip(&t)
        .position(|(a, b)| a != b)
        .unwrap_or(o.len().min(t.len()));
    panic!(
        "{what}: the XML differs at line {} (ours {} lines, {} bytes; thin_dump's {} lines, \
         {} bytes)\nours:      {:?}\nthin_dump: {:?}",
        i + 1,
        o.len(),
        ours.len(),
        t.len(),
        theirs.len(),
        o.get(i),
        t.get(i)
    );
}

/// Compares our dump of `dev` with thin_dump's of `file` (the same image), plain and with
/// each option; returns the plain dump.
fn compare_dumps(tools: &Tools, dev: &dyn MetaDevice, file: &Path, what: &str) -> String {
    let ours = our_dump(dev, &DumpOptions::default());
    assert_same_xml(&ours, &thin_dump(tools, file, &[]), what);
    let skip = DumpOptions {
        skip_mappings: true,
        ..DumpOptions::default()
    };
    assert_same_xml(
        &our_dump(dev, &skip),
        &thin_dump(tools, file, &["--skip-mappings"]),
        &format!("{what}, --skip-mappings"),
    );
    // The last device listed, if any.
    if let Some(id) = ours
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("  <device dev_id=\""))
        .and_then(|l| l.split('"').next())
    {
        let only = DumpOptions {
            dev_id: Some(id.parse().expect("a device id")),
            ..DumpOptions::default()
        };
        assert_same_xml(
            &our_dump(dev, &only),
            &thin_dump(tools, file, &["--dev-id", id]),
            &format!("{what}, --dev-id {id}"),
        );
    }
    ours
}

/// The largest `mapped_blocks` of a dump's devices.
fn largest_device(xml: &str) -> u64 {
    xml.lines()
        .filter_map(|l| l.split("mapped_blocks=\"").nth(1))
        .filter_map(|l| l.split('"').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Runs a seeded workload and calls `f` with each committed image (every `every` steps).
fn workload_images(seed: u64, cfg: Config, steps: u64, every: u64, mut f: impl FnMut(&Workload)) {
    let dev = Arc::new(MemMetaDevice::new(NR_META_BLOCKS));
    let mut w = Workload::format(dev, cfg, seed);
    for i in 1..=steps {
        w.step();
        if i % every == 0 {
            w.commit();
            f(&w);
        }
    }
}

/// A workload shape per seed: varied thins over several data bitmaps, or a tight data
/// space where freed blocks are reused. The workload commits only when told: its own
/// reopens and checks are slow in debug builds.
fn config_for(seed: u64) -> Config {
    let varied = Config {
        nr_data_blocks: 50_000,
        max_vblock: 3000,
        nr_thin_ids: 10,
        max_run: 300,
        shrink_rarity: 1,
        commit_ops: false,
        cache_nodes: None,
    };
    match seed % 2 {
        0 => varied,
        _ => Config {
            nr_data_blocks: 300,
            max_vblock: 600,
            ..varied
        },
    }
}

/// Mappings of the big thin: more than one level of internal nodes holds (252 * 252).
const BIG_THIN_MAPPINGS: u64 = 70_000;

/// An image with a thin of `BIG_THIN_MAPPINGS` mappings (a mapping tree of three levels)
/// in runs of 1000, a snapshot of it, rewrites of both after the snapshot, a deleted thin,
/// and a held metadata snapshot. Built once and shared by the tests.
fn big_image() -> MemMetaDevice {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    let bytes = IMAGE.get_or_init(|| {
        let dev = Arc::new(MemMetaDevice::new(NR_META_BLOCKS));
        let opts = FormatOptions {
            data_block_size_sectors: 128,
            nr_data_blocks: 200_000,
        };
        let md = ThinMetadata::format(dev.clone(), opts).expect("format");
        let map = |thin: u32, v: u64| {
            let b = md.alloc_data_block().expect("a free data block");
            md.insert(ThinId(thin), VBlock(v), b).expect("insert");
        };
        md.create_thin(ThinId(5)).expect("create");
        md.create_thin(ThinId(9)).expect("create");
        for v in 0..BIG_THIN_MAPPINGS {
            map(5, v + v / 1000 * 24);
            if v % 100 == 0 {
                map(9, v);
            }
        }
        md.create_snap(ThinId(7), ThinId(5)).expect("snapshot");
        for v in (0..BIG_THIN_MAPPINGS).step_by(97) {
            map(5, v);
        }
        md.delete_thin(ThinId(9)).expect("delete");
        md.commit().expect("commit");
        md.reserve_metadata_snap().expect("hold a snapshot");
        for v in (0..BIG_THIN_MAPPINGS).step_by(89) {
            map(7, v);
        }
        md.set_transaction_id(0, 3).expect("transaction id");
        md.commit().expect("commit");
        dev.to_bytes()
    });
    MemMetaDevice::from_bytes(bytes)
}

/// Our dump of `dev` against thin_dump's of the same image, with every option, and with
/// `-m` when a snapshot is held; returns our plain dump.
fn check_dump(tools: &Tools, dev: &dyn MetaDevice, dir: &ScratchDir, what: &str) -> String {
    let file = dir.join("meta.bin");
    write_image(dev, &file);
    let ours = compare_dumps(tools, dev, &file, what);
    if ours.lines().next().is_some() && held_root(dev) {
        let snap = DumpOptions {
            metadata_snap: true,
            ..DumpOptions::default()
        };
        assert_same_xml(
            &our_dump(dev, &snap),
            &thin_dump(tools, &file, &["-m"]),
            &format!("{what}, -m"),
        );
    }
    ours
}

/// Whether the superblock names a held metadata snapshot.
fn held_root(dev: &dyn MetaDevice) -> bool {
    let mut raw = [0u8; block_io::META_BLOCK_SIZE];
    dev.read_block(0, &mut raw).expect("reading the superblock");
    // held_root: after csum, flags, blocknr, uuid, magic, version, time, trans_id.
    raw[56..64].iter().any(|&b| b != 0)
}

/// thin_restore of our dump of `dev` must pass thin_check, list the same XML, and our dump
/// of thin_restore's metadata must be thin_dump's.
fn check_thin_restore_of_our_dump(
    tools: &Tools,
    dev: &dyn MetaDevice,
    dir: &ScratchDir,
    what: &str,
) {
    let (xml_file, meta) = (dir.join("dump.xml"), dir.join("restored.bin"));
    let ours = our_dump(dev, &DumpOptions::default());
    std::fs::write(&xml_file, &ours).expect("writing the XML");
    let _ = std::fs::remove_file(&meta);
    drop(FileMetaDevice::create(&meta, NR_META_BLOCKS).expect("creating the image"));
    tools
        .restore(&xml_file, &meta)
        .unwrap_or_else(|e| panic!("{what}: thin_restore of our dump: {e}"));
    tools
        .check(&meta)
        .unwrap_or_else(|e| panic!("{what}: thin_check of thin_restore's metadata: {e}"));
    let restored = FileMetaDevice::open(&meta).expect("opening the restored image");
    let what = format!("{what}, thin_restore's metadata");
    let again = compare_dumps(tools, &restored, &meta, &what);
    assert_same_xml(
        &again,
        &ours,
        &format!("{what} against the dump it came from"),
    );
}

/// Our restore of thin_dump's output for `dev` must pass thin_check and our check, and
/// thin_dump must list it as the input.
fn check_our_restore_of_thin_dump(
    tools: &Tools,
    dev: &dyn MetaDevice,
    dir: &ScratchDir,
    what: &str,
) {
    let (file, meta) = (dir.join("meta.bin"), dir.join("restored.bin"));
    write_image(dev, &file);
    let xml = thin_dump(tools, &file, &[]);
    let _ = std::fs::remove_file(&meta);
    let restored = Arc::new(FileMetaDevice::create(&meta, NR_META_BLOCKS).expect("image"));
    let summary = restore(&mut xml.as_bytes(), restored.clone())
        .unwrap_or_else(|e| panic!("{what}: our restore: {e}"));
    assert!(
        summary.mapped_blocks_corrected.is_empty(),
        "{what}: {summary:?}"
    );
    tools
        .check(&meta)
        .unwrap_or_else(|e| panic!("{what}: thin_check of our restore: {e}"));
    let problems = our_check(&*restored);
    assert!(problems.is_empty(), "{what}: our check: {problems:#?}");
    assert_same_xml(
        &thin_dump(tools, &meta, &[]),
        &xml,
        &format!("{what}: thin_dump of our restore against its input"),
    );
}

#[test]
fn our_dump_is_thin_dumps_output() {
    let test = "our_dump_is_thin_dumps_output";
    let Some(tools) = Tools::find(test) else {
        return;
    };
    let dir = ScratchDir::new("xml-dump");
    let (mut images, mut held, mut lines) = (0, 0, 0);
    for_each_seed(test, "XML", 4, |seed| {
        workload_images(seed, config_for(seed), 600, 200, |w| {
            let what = format!("seed {seed} after {} operations", w.stats.ops);
            lines += check_dump(&tools, &*w.dev, &dir, &what).lines().count();
            held += usize::from(w.model.committed.held.is_some());
            images += 1;
        });
    });
    let big = check_dump(&tools, &big_image(), &dir, "the big image");
    assert!(
        largest_device(&big) >= BIG_THIN_MAPPINGS,
        "{}",
        largest_device(&big)
    );
    println!(
        "XML dump: {images} workload images dumped as thin_dump does ({held} with a held \
         snapshot, {lines} lines), and one with a thin of {BIG_THIN_MAPPINGS} mappings"
    );
}

#[test]
fn thin_restore_takes_our_dump_and_we_dump_its_metadata_as_thin_dump() {
    let test = "thin_restore_takes_our_dump_and_we_dump_its_metadata_as_thin_dump";
    let Some(tools) = Tools::find(test) else {
        return;
    };
    let dir = ScratchDir::new("xml-thin-restore");
    let mut restored = 0;
    for_each_seed(test, "XML", 4, |seed| {
        // Other workloads than the dump test's, of the same shapes.
        workload_images(seed + 100, config_for(seed), 600, 600, |w| {
            check_thin_restore_of_our_dump(&tools, &*w.dev, &dir, &format!("seed {seed}"));
            restored += 1;
        });
    });
    check_thin_restore_of_our_dump(&tools, &big_image(), &dir, "the big image");
    println!("XML thin_restore: {restored} of our dumps and the big image's restored, checked and dumped back");
}

#[test]
fn our_restore_of_thin_dumps_output_passes_thin_check_and_dumps_back() {
    let test = "our_restore_of_thin_dumps_output_passes_thin_check_and_dumps_back";
    let Some(tools) = Tools::find(test) else {
        return;
    };
    let dir = ScratchDir::new("xml-restore");
    let mut restored = 0;
    for_each_seed(test, "XML", 4, |seed| {
        workload_images(seed + 200, config_for(seed), 600, 600, |w| {
            check_our_restore_of_thin_dump(&tools, &*w.dev, &dir, &format!("seed {seed}"));
            restored += 1;
        });
    });
    check_our_restore_of_thin_dump(&tools, &big_image(), &dir, "the big image");
    println!("XML restore: {restored} thin_dump outputs and the big image's restored, checked and dumped back");
}

/// Random XML: devices with single and range mappings, snapshots sharing chunks of data
/// blocks with their origin (some blocks referenced three and more times), large and
/// extreme ids and virtual blocks, every data block below `nr_data_blocks`; with `big`, a
/// device of one long run, whose mapping tree has three levels.
fn random_xml(rng: &mut SmallRng, big: bool) -> String {
    let nr_data_blocks: u64 = rng.gen_range(1_000..100_000) + if big { 80_000 } else { 0 };
    let time: u32 = rng.gen_range(0..50);
    let mut xml = format!(
        "<superblock uuid=\"\" time=\"{time}\" transaction=\"{}\" flags=\"0\" version=\"2\" \
         data_block_size=\"{}\" nr_data_blocks=\"{nr_data_blocks}\">\n",
        rng.gen_range(0..1000u64),
        128 * rng.gen_range(1..=16u32)
    );
    let mut ids: Vec<u32> = (0..rng.gen_range(1..7))
        .map(|i| match rng.gen_range(0..6) {
            0 => MAX_THIN_ID - i,
            1 => rng.gen_range(0..MAX_THIN_ID),
            _ => i,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut origin: Vec<(u64, u64, u32)> = Vec::new();
    for (n, id) in ids.into_iter().enumerate() {
        // Runs of (virtual block, data block, length, time). A device copies chunks of the
        // previous one's mappings, so data blocks are shared.
        let mut runs: Vec<(u64, u64, u64, u32)> = origin
            .chunks(50)
            .filter(|_| rng.gen_bool(0.6))
            .flatten()
            .map(|&(v, d, t)| (v, d, 1, t))
            .collect();
        if big && n == 0 {
            runs.push((1000, 5, rng.gen_range(64_000..80_000), 0));
        }
        for _ in 0..rng.gen_range(0..30) {
            let len = rng.gen_range(1..600u64).min(nr_data_blocks);
            let v = if rng.gen_bool(0.1) {
                u64::MAX - rng.gen_range(len..10_000)
            } else {
                rng.gen_range(0..5_000_000)
            };
            let d = rng.gen_range(0..=nr_data_blocks - len);
            runs.push((v, d, len, rng.gen_range(0..=time)));
        }
        // Keep the first of overlapping runs.
        runs.sort_unstable();
        let mut mappings: Vec<(u64, u64, u32)> = Vec::new();
        for (v, d, len, t) in runs {
            for i in 0..len {
                if mappings.last().is_none_or(|&(last, _, _)| v + i > last) {
                    mappings.push((v + i, d + i, t));
                }
            }
        }
        let creation = rng.gen_range(0..=time);
        xml.push_str(&format!(
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"{}\" \
             creation_time=\"{creation}\" snap_time=\"{}\">\n",
            mappings.len(),
            rng.gen_range(0..100u64),
            rng.gen_range(creation..=time)
        ));
        // Runs longer than 100 as range mappings, everything else one element a mapping:
        // both tools must coalesce those themselves.
        let mut rest = mappings.as_slice();
        while let Some(&(v, d, t)) = rest.first() {
            let len = rest
                .iter()
                .enumerate()
                .take_while(|&(i, &m)| m == (v + i as u64, d + i as u64, t))
                .count();
            if len > 100 {
                xml.push_str(&format!(
                    "    <range_mapping origin_begin=\"{v}\" data_begin=\"{d}\" length=\"{len}\" \
                     time=\"{t}\"/>\n"
                ));
            } else {
                for &(v, d, t) in &rest[..len] {
                    xml.push_str(&format!(
                        "    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" \
                         time=\"{t}\"/>\n"
                    ));
                }
            }
            rest = &rest[len..];
        }
        xml.push_str("  </device>\n");
        origin = mappings;
    }
    xml.push_str("</superblock>\n");
    xml
}

#[test]
fn our_restore_and_thin_restore_write_metadata_thin_dump_lists_alike() {
    let test = "our_restore_and_thin_restore_write_metadata_thin_dump_lists_alike";
    let Some(tools) = Tools::find(test) else {
        return;
    };
    let mut compared = 0;
    for_each_seed(test, "XML", 6, |seed| {
        // Every third with a device of three levels.
        let xml = random_xml(&mut SmallRng::seed_from_u64(seed), seed % 3 == 2);
        let dir = ScratchDir::new("xml-both");
        let (xml_file, theirs, ours) = (dir.join("in.xml"), dir.join("t.bin"), dir.join("o.bin"));
        std::fs::write(&xml_file, &xml).expect("writing the XML");
        drop(FileMetaDevice::create(&theirs, NR_META_BLOCKS).expect("image"));
        tools
            .restore(&xml_file, &theirs)
            .unwrap_or_else(|e| panic!("seed {seed}: thin_restore: {e}"));
        let dev = Arc::new(FileMetaDevice::create(&ours, NR_META_BLOCKS).expect("image"));
        let mut input = std::io::BufReader::new(std::fs::File::open(&xml_file).expect("XML"));
        restore(&mut input, dev.clone()).unwrap_or_else(|e| panic!("seed {seed}: ours: {e}"));
        tools
            .check(&ours)
            .unwrap_or_else(|e| panic!("seed {seed}: thin_check of our restore: {e}"));
        let problems = our_check(&*dev);
        assert!(problems.is_empty(), "seed {seed}: our check: {problems:#?}");
        let want = thin_dump(&tools, &theirs, &[]);
        assert_same_xml(
            &thin_dump(&tools, &ours, &[]),
            &want,
            &format!("seed {seed}: thin_dump of our restore against thin_restore's"),
        );
        let theirs_dev = FileMetaDevice::open(&theirs).expect("thin_restore's image");
        assert_same_xml(
            &our_dump(&theirs_dev, &DumpOptions::default()),
            &want,
            &format!("seed {seed}: our dump of thin_restore's metadata"),
        );
        compared += 1;
    });
    println!("XML restore: {compared} generated XMLs restored by both tools alike");
}

#[test]
fn malformed_xml_is_refused_and_the_device_left_alone() {
    let test = "malformed_xml_is_refused_and_the_device_left_alone";
    let Some(tools) = Tools::find(test) else {
        return;
    };
    let dir = ScratchDir::new("xml-malformed");
    let (meta, xml_file) = (dir.join("meta.bin"), dir.join("bad.xml"));
    let good = random_xml(&mut SmallRng::seed_from_u64(1), false);
    let dev = Arc::new(FileMetaDevice::create(&meta, 1024).expect("image"));
    restore(&mut good.as_bytes(), dev.clone()).expect("the good XML restores");
    let before = std::fs::read(&meta).expect("reading the image");
    let lines: Vec<&str> = good.lines().collect();
    let first_mapping = lines
        .iter()
        .position(|l| l.contains("single_mapping"))
        .expect("a mapping");
    let with_line = |i: usize, line: &str| {
        let mut l = lines.clone();
        l.insert(i, line);
        l.join("\n") + "\n"
    };
    let dup = lines[first_mapping];
    let nr_data: u64 = lines[0]
        .split("nr_data_blocks=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("nr_data_blocks");
    let past_end = format!(
        "    <single_mapping origin_block=\"{}\" data_block=\"{nr_data}\" time=\"0\"/>",
        u64::MAX
    );
    let truncated = &good[..good.len() * 2 / 3];
    // (XML, line of the error, words of the error, thin_restore refuses it too)
    let cases: Vec<(String, usize, &str, bool)> = vec![
        (
            with_line(first_mapping + 1, dup),
            first_mapping + 2,
            "mapped twice",
            false,
        ),
        (
            with_line(first_mapping, &past_end),
            first_mapping + 1,
            "past the end",
            true,
        ),
        (
            with_line(first_mapping, "    <bogus/>"),
            first_mapping + 1,
            "unknown element",
            true,
        ),
        (
            with_line(
                1,
                "  <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\"/>",
            ),
            2,
            "no creation_time attribute",
            true,
        ),
        (
            truncated.to_string(),
            truncated.matches('\n').count() + 1,
            "the input ends",
            true,
        ),
    ];
    for (xml, line, words, thin_restore_refuses) in cases {
        match restore(&mut xml.as_bytes(), dev.clone()) {
            Err(Error::Xml { line: l, reason }) => {
                assert!(reason.contains(words), "expected {words:?}, got {reason:?}");
                assert_eq!(l, line as u64, "{reason}");
            }
            r => panic!("restoring XML with {words:?} gave {r:?}"),
        }
        assert!(
            std::fs::read(&meta).expect("image") == before,
            "a refused restore ({words}) changed the device"
        );
        if thin_restore_refuses {
            std::fs::write(&xml_file, &xml).expect("writing the XML");
            let copy = dir.join("copy.bin");
            std::fs::write(&copy, &before).expect("copy");
            assert!(
                tools.restore(&xml_file, &copy).is_err(),
                "thin_restore accepts the XML with {words:?}"
            );
        }
    }
    tools
        .check(&meta)
        .unwrap_or_else(|e| panic!("thin_check after the refused restores: {e}"));
    println!("XML malformed: 5 bad inputs refused with their line, the device untouched");
}
