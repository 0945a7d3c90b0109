//! Dump and restore against metadata built through the public API: what a dump lists is
//! what the metadata holds, dump -> restore -> dump gives the same XML, restored metadata
//! opens, checks clean and shares data blocks as the XML says, and bad input or damaged
//! metadata is an error that leaves the devices alone.

use super::{dump, restore, CorrectedCount, DumpOptions};
use crate::check::{check, CheckOptions};
use crate::error::Error;
use crate::{DataBlock, Lookup, ThinId, ThinMetadata, VBlock};
use block_io::{MemMetaDevice, MetaDevice};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::test_util::new_pool;

fn map(md: &ThinMetadata, thin: u32, v: u64) -> DataBlock {
    let b = md.alloc_data_block().expect("data block");
    md.insert(ThinId(thin), VBlock(v), b).expect("insert");
    b
}

fn dump_string(dev: &dyn MetaDevice, opts: &DumpOptions) -> String {
    let mut out = Vec::new();
    dump(dev, &mut out, opts).expect("dump");
    String::from_utf8(out).expect("dump is UTF-8")
}

fn restore_str(xml: &str, dev: Arc<MemMetaDevice>) -> crate::Result<super::RestoreSummary> {
    restore(&mut xml.as_bytes(), dev)
}

#[track_caller]
fn assert_checks_clean(dev: &MemMetaDevice, what: &str) {
    let report = check(dev, &CheckOptions::default());
    assert!(report.is_clean(), "{what}: {report}");
}

/// A pool with runs, holes, a snapshot that shares blocks with its origin, writes after
/// the snapshot (new times), a deleted thin and an empty thin.
fn varied_pool() -> (Arc<MemMetaDevice>, ThinMetadata) {
    let (dev, md) = new_pool(2048, 20_000);
    md.create_thin(ThinId(1)).expect("thin 1");
    for v in 0..700 {
        map(&md, 1, v);
    }
    for v in (1000..1400).step_by(3) {
        map(&md, 1, v);
    }
    md.create_thin(ThinId(9)).expect("thin 9");
    for v in 0..50 {
        map(&md, 9, v * 7);
    }
    md.create_snap(ThinId(4), ThinId(1)).expect("snapshot");
    for v in 100..140 {
        map(&md, 1, v);
    }
    for v in 2000..2010 {
        map(&md, 4, v);
    }
    md.create_snap(ThinId(6), ThinId(4))
        .expect("snapshot of a snapshot");
    md.delete_thin(ThinId(9)).expect("delete");
    md.create_thin(ThinId(12)).expect("empty thin");
    md.set_transaction_id(0, 42).expect("transaction id");
    md.commit().expect("commit");
    (dev, md)
}

/// Every mapping of every thin: id -> vblock -> (data block, time).
fn mappings(md: &ThinMetadata) -> BTreeMap<u32, BTreeMap<u64, (u64, u32)>> {
    md.thins()
        .into_iter()
        .map(|t| {
            let mut m = BTreeMap::new();
            md.for_each_mapping(t, VBlock(0), |v, d, time| {
                m.insert(v.0, (d.0, time));
                true
            })
            .expect("walk");
            (t.0, m)
        })
        .collect()
}

#[test]
fn dump_lists_what_the_metadata_holds() {
    let (dev, md) = varied_pool();
    let xml = dump_string(&*dev, &DumpOptions::default());
    let lines: Vec<&str> = xml.lines().collect();
    assert_eq!(
        lines[0],
        "<superblock uuid=\"\" time=\"2\" transaction=\"42\" flags=\"0\" version=\"2\" \
         data_block_size=\"128\" nr_data_blocks=\"20000\">"
    );
    assert_eq!(*lines.last().unwrap(), "</superblock>");
    assert!(xml.ends_with("</superblock>\n"));
    let devices: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("  <device "))
        .copied()
        .collect();
    assert_eq!(devices.len(), 4, "{xml}");
    assert!(devices[0].starts_with("  <device dev_id=\"1\" mapped_blocks=\"834\""));
    assert!(devices[3].starts_with("  <device dev_id=\"12\" mapped_blocks=\"0\""));
    // Thin 1: 0..100 at time 0, 100..140 rewritten at time 1, 140..700 at time 0 again.
    let t1: Vec<&str> = lines[2..5].to_vec();
    assert_eq!(
        t1,
        [
            "    <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"100\" time=\"0\"/>",
            "    <range_mapping origin_begin=\"100\" data_begin=\"884\" length=\"40\" time=\"1\"/>",
            "    <range_mapping origin_begin=\"140\" data_begin=\"140\" length=\"560\" time=\"0\"/>",
        ]
    );
    assert_eq!(
        lines[5],
        "    <single_mapping origin_block=\"1000\" data_block=\"700\" time=\"0\"/>"
    );
    // An empty thin: the device's two lines and nothing between.
    let empty = lines
        .iter()
        .position(|l| l.contains("dev_id=\"12\""))
        .unwrap();
    assert_eq!(lines[empty + 1], "  </device>");
    let nr_mapping_lines = lines.iter().filter(|l| l.contains("_mapping ")).count();
    assert!(nr_mapping_lines > 400, "{nr_mapping_lines}");
    drop(md);
}

#[test]
fn dump_restore_dump_is_identical_and_restored_metadata_works() {
    let (dev, md) = varied_pool();
    let xml = dump_string(&*dev, &DumpOptions::default());
    let want = mappings(&md);

    let dev2 = Arc::new(MemMetaDevice::new(1024));
    let summary = restore_str(&xml, dev2.clone()).expect("restore");
    assert_eq!(summary.nr_devices, 4);
    assert_eq!(
        summary.nr_mappings,
        want.values().map(|m| m.len() as u64).sum::<u64>()
    );
    assert!(summary.mapped_blocks_corrected.is_empty());
    assert!(summary.nr_shared_data_blocks > 500, "{summary:?}");
    assert_eq!(summary.nr_metadata_blocks, 1024);
    assert_checks_clean(&dev2, "restored");
    assert_eq!(dump_string(&*dev2, &DumpOptions::default()), xml);

    let restored = ThinMetadata::open(dev2.clone()).expect("restored metadata opens");
    assert_eq!(mappings(&restored), want);
    for t in md.thins() {
        assert_eq!(restored.details(t).unwrap(), md.details(t).unwrap());
    }
    let (st, st2) = (md.status(), restored.status());
    assert_eq!(
        (st2.transaction_id, st2.time, st2.nr_free_data_blocks),
        (st.transaction_id, st.time, st.nr_free_data_blocks)
    );
    // Blocks the snapshot shares with its origin are shared: a write must copy them.
    let shared = |m: &ThinMetadata, t, v| match m.lookup(ThinId(t), VBlock(v)).unwrap() {
        Lookup::Provisioned { shared, .. } => shared,
        Lookup::Unprovisioned => panic!("thin {t} block {v} unmapped"),
    };
    assert!(shared(&restored, 4, 0) && shared(&restored, 1, 0));
    assert!(!shared(&restored, 1, 100), "rewritten after the snapshot");
    // The restored pool takes changes and stays clean.
    map(&restored, 4, 0);
    restored.delete_thin(ThinId(1)).unwrap();
    restored.commit().unwrap();
    assert_checks_clean(&dev2, "restored, then changed");
}

#[test]
fn dump_of_the_held_snapshot_and_dump_options() {
    let (dev, md) = varied_pool();
    let before = dump_string(&*dev, &DumpOptions::default());
    md.reserve_metadata_snap().unwrap();
    md.delete_thin(ThinId(4)).unwrap();
    map(&md, 1, 5000);
    md.set_transaction_id(42, 43).unwrap();
    md.commit().unwrap();
    let snap = dump_string(
        &*dev,
        &DumpOptions {
            metadata_snap: true,
            ..DumpOptions::default()
        },
    );
    // The snapshot is the metadata as it was, except that the copy's data size is zero.
    let expected = before.replacen("nr_data_blocks=\"20000\"", "nr_data_blocks=\"0\"", 1);
    assert_eq!(snap, expected);
    assert_ne!(dump_string(&*dev, &DumpOptions::default()), before);

    let only6 = dump_string(
        &*dev,
        &DumpOptions {
            dev_id: Some(6),
            skip_mappings: true,
            ..DumpOptions::default()
        },
    );
    let lines: Vec<&str> = only6.lines().collect();
    assert_eq!(lines.len(), 4, "{only6}");
    assert!(lines[1].starts_with("  <device dev_id=\"6\" "));
    assert_eq!(lines[2], "  </device>");

    let none = dump_string(
        &*dev,
        &DumpOptions {
            dev_id: Some(999),
            ..DumpOptions::default()
        },
    );
    assert_eq!(
        none.lines().count(),
        2,
        "only the superblock, as thin_dump: {none}"
    );

    md.release_metadata_snap().unwrap();
    md.commit().unwrap();
    let mut out = Vec::new();
    let opts = DumpOptions {
        metadata_snap: true,
        ..DumpOptions::default()
    };
    let err = dump(&*dev, &mut out, &opts).unwrap_err();
    assert!(
        err.to_string().contains("no metadata snapshot is held"),
        "{err}"
    );
}

#[test]
fn restore_keeps_superblock_fields_and_recomputes_mapped_blocks() {
    let xml = "<superblock uuid=\"my-pool\" time=\"7\" transaction=\"99\" flags=\"1\" \
               version=\"1\" data_block_size=\"256\" nr_data_blocks=\"50\">\n\
               <device dev_id=\"3\" mapped_blocks=\"17\" transaction=\"5\" creation_time=\"2\" \
               snap_time=\"6\">\n\
               <single_mapping origin_block=\"4\" data_block=\"9\" time=\"6\"/>\n\
               <single_mapping origin_block=\"8\" data_block=\"9\" time=\"6\"/>\n\
               <range_mapping origin_begin=\"10\" data_begin=\"9\" length=\"3\" time=\"2\"/>\n\
               </device>\n</superblock>\n";
    let dev = Arc::new(MemMetaDevice::new(256));
    let summary = restore_str(xml, dev.clone()).expect("restore");
    assert_eq!(
        summary.mapped_blocks_corrected,
        [CorrectedCount {
            dev_id: 3,
            stated: 17,
            actual: 5
        }]
    );
    assert_eq!(
        (summary.nr_data_blocks_used, summary.nr_shared_data_blocks),
        (3, 1)
    );
    let mut raw = [0u8; 4096];
    dev.read_block(0, &mut raw).unwrap();
    let sb = crate::format::Superblock::decode(&raw, 0).unwrap();
    assert_eq!(&sb.uuid[..7], b"my-pool");
    assert_eq!((sb.version, sb.flags, sb.time, sb.trans_id), (1, 1, 7, 99));
    assert_eq!(sb.data_block_size, 256);
    assert_checks_clean(&dev, "restored with a count of 3");
    let out = dump_string(&*dev, &DumpOptions::default());
    assert_eq!(
        out,
        "<superblock uuid=\"\" time=\"7\" transaction=\"99\" flags=\"1\" version=\"1\" \
         data_block_size=\"256\" nr_data_blocks=\"50\">\n  \
         <device dev_id=\"3\" mapped_blocks=\"5\" transaction=\"5\" creation_time=\"2\" \
         snap_time=\"6\">\n    \
         <single_mapping origin_block=\"4\" data_block=\"9\" time=\"6\"/>\n    \
         <single_mapping origin_block=\"8\" data_block=\"9\" time=\"6\"/>\n    \
         <range_mapping origin_begin=\"10\" data_begin=\"9\" length=\"3\" time=\"2\"/>\n  \
         </device>\n</superblock>\n"
    );
    let md = ThinMetadata::open(dev).expect("opens");
    assert_eq!(md.data_block_count(DataBlock(9)), 3);
    assert_eq!(md.data_block_count(DataBlock(10)), 1);
    assert!(md.status().needs_check, "flags restored");
}

#[test]
fn bad_xml_leaves_the_device_untouched() {
    let (dev, _md) = varied_pool();
    let xml = dump_string(&*dev, &DumpOptions::default());
    let target = Arc::new(MemMetaDevice::new(1024));
    restore_str(&xml, target.clone()).expect("first restore");
    let before = target.to_bytes();
    // Thin 1 maps block 0 again at the end of its list: everything before is valid.
    let bad = xml.replacen(
        "  </device>\n",
        "    <single_mapping origin_block=\"0\" data_block=\"1\" time=\"0\"/>\n  </device>\n",
        1,
    );
    let line = bad.lines().position(|l| l == "  </device>").unwrap() as u64;
    match restore_str(&bad, target.clone()) {
        Err(Error::Xml { line: l, reason }) => {
            assert_eq!(l, line, "{reason}");
            assert!(reason.contains("mapped twice"), "{reason}");
        }
        other => panic!("expected an XML error, got {other:?}"),
    }
    let truncated = &xml[..xml.len() / 2];
    assert!(matches!(
        restore_str(truncated, target.clone()),
        Err(Error::Xml { .. })
    ));
    assert!(
        target.to_bytes() == before,
        "a rejected restore wrote to the device"
    );
}

#[test]
fn restore_refuses_a_device_too_small_before_writing() {
    // 50 leaves and their root, 7 data bitmaps and the other space-map blocks, and the
    // pool's reserve of 64 / 8 blocks: more than 64.
    let xml = singles_xml(1, 252 * 50);
    let small = Arc::new(MemMetaDevice::new(64));
    let err = restore_str(&xml, small.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(why) if why.contains("too small")),
        "{err}"
    );
    assert!(small.to_bytes().iter().all(|&b| b == 0));
    // A data space of 2^40 blocks, fully mapped: refused at once, before its space map or
    // its references take memory and time.
    let huge = "<superblock uuid=\"\" time=\"0\" transaction=\"0\" data_block_size=\"128\" \
                nr_data_blocks=\"1099511627775\"><device dev_id=\"0\" mapped_blocks=\"0\" \
                transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><range_mapping \
                origin_begin=\"0\" data_begin=\"0\" length=\"1099511627775\" time=\"0\"/>\
                </device></superblock>";
    let err = restore_str(huge, small.clone()).unwrap_err();
    assert!(
        err.to_string()
            .contains("more than dm-thin's metadata format can address"),
        "{err}"
    );
    assert!(small.to_bytes().iter().all(|&b| b == 0));
    let enough = Arc::new(MemMetaDevice::new(128));
    restore_str(&xml, enough.clone()).expect("fits in 128 blocks");
    assert_checks_clean(&enough, "restored into a small device");
}

/// `nr_devices` devices of `per_device` mappings each, at even virtual blocks, with
/// alternating times, so that every mapping is a line of its own.
fn singles_xml(nr_devices: u64, per_device: u64) -> String {
    let mut xml = String::from(
        "<superblock uuid=\"\" time=\"1\" transaction=\"1\" flags=\"0\" version=\"2\" \
         data_block_size=\"128\" nr_data_blocks=\"100000\">\n",
    );
    for id in 0..nr_devices {
        xml.push_str(&format!(
            "  <device dev_id=\"{id}\" mapped_blocks=\"{per_device}\" transaction=\"0\" \
             creation_time=\"0\" snap_time=\"0\">\n"
        ));
        for v in 0..per_device {
            xml.push_str(&format!(
                "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>\n",
                v * 2,
                id * per_device + v,
                v % 2
            ));
        }
        xml.push_str("  </device>\n");
    }
    xml.push_str("</superblock>\n");
    xml
}

#[test]
fn large_restore_spills_nodes_and_round_trips() {
    // Devices of more leaves than the spill threshold.
    let per_device = 252 * (super::restore::SPILL_NODES as u64 + 4);
    let xml = singles_xml(3, per_device);
    let dev = Arc::new(MemMetaDevice::new(2048));
    let summary = restore_str(&xml, dev.clone()).expect("restore");
    assert_eq!(summary.nr_mappings, 3 * per_device);
    assert_checks_clean(&dev, "large restore");
    assert_eq!(dump_string(&*dev, &DumpOptions::default()), xml);
    let md = ThinMetadata::open(dev).expect("opens");
    let last = VBlock(2 * (per_device - 1));
    assert_eq!(md.highest_mapped(ThinId(2)).unwrap(), Some(last));
}

#[test]
fn damaged_metadata_is_an_error_not_a_panic() {
    let (dev, md) = varied_pool();
    let xml = dump_string(&*dev, &DumpOptions::default());
    drop(md);
    let image = dev.to_bytes();
    let mut clean = Vec::new();
    let mut errors = 0;
    // Flip a byte in each block in turn: every dump either fails or (for blocks it does
    // not read) matches the clean dump.
    // Allocation runs front to back: the blocks in use are near the start.
    for b in 0..160 {
        let d = MemMetaDevice::from_bytes(&image);
        d.patch(b, 100, &[image[b as usize * 4096 + 100] ^ 0x5a])
            .unwrap();
        clean.clear();
        match dump(&d, &mut clean, &DumpOptions::default()) {
            Ok(()) => assert_eq!(String::from_utf8_lossy(&clean), xml, "block {b}"),
            Err(e) => {
                assert!(e.is_corrupt(), "block {b}: {e}");
                errors += 1;
            }
        }
    }
    assert!(errors > 10, "{errors}");
    let blank = MemMetaDevice::new(16);
    let err = dump(&blank, &mut clean, &DumpOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NotFormatted(_)), "{err}");
}

#[test]
fn dump_write_errors_are_stream_errors() {
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("no space left"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (dev, _md) = varied_pool();
    let err = dump(&*dev, &mut Full, &DumpOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Stream {
                op: "writing the XML dump",
                ..
            }
        ),
        "{err}"
    );
}

/// Damage with valid checksums, which only the structure can reveal: an internal node
/// that points at itself (a cycle) or twice at one child (a node shared within one tree)
/// makes the dump fail, naming the block, instead of looping or listing mappings twice.
#[test]
fn cycles_and_repeated_children_are_errors() {
    use crate::format::{Node, NodeKind, Superblock};
    let (dev, md) = new_pool(1024, 100_000);
    md.create_thin(ThinId(1)).unwrap();
    for v in 0..2000 {
        map(&md, 1, v * 2);
    }
    md.commit().unwrap();
    drop(md);
    let read_node = |b: u64, value_size: usize| {
        let mut raw = [0u8; 4096];
        dev.read_block(b, &mut raw).unwrap();
        Node::decode(&raw, b, value_size).unwrap()
    };
    let mut raw = [0u8; 4096];
    dev.read_block(0, &mut raw).unwrap();
    let sb = Superblock::decode(&raw, 0).unwrap();
    let top = read_node(sb.data_mapping_root, 8);
    let root = top.value_u64(0);
    let node = read_node(root, 8);
    assert_eq!(
        node.kind,
        NodeKind::Internal,
        "2000 mappings take several leaves"
    );
    let image = dev.to_bytes();
    for (what, child0) in [("a cycle", root), ("a repeated child", node.value_u64(1))] {
        let damaged = MemMetaDevice::from_bytes(&image);
        let mut bad = node.clone();
        bad.set_value(0, &child0.to_le_bytes());
        damaged.write_block(root, &bad.encode(root)).unwrap();
        let mut out = Vec::new();
        match dump(&damaged, &mut out, &DumpOptions::default()) {
            Err(Error::Corrupt { path, reason, .. }) => {
                assert_eq!(path.first(), Some(&root), "{what}: {reason}");
            }
            r => panic!("{what}: dump gave {r:?}"),
        }
    }
}
