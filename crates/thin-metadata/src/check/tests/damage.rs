//! Each kind of damage is reported, of the right kind, at the right block.

use super::*;
use crate::format::{pack_block_time, DeviceDetails};

/// A pool with thin 1 in a two-level tree (300 mappings in two leaves): the root, its
/// leaves in key order, and the parent's key of the second leaf.
fn two_leaf_thin() -> (Arc<MemMetaDevice>, ThinMetadata, u64, Vec<(u64, Node)>, u64) {
    let (dev, md) = pool_with_thin(300);
    let root = thin_root(&dev, 1);
    let root_node = read_node(&dev, root, 8);
    assert_eq!(
        (root_node.kind, root_node.nr_entries()),
        (NodeKind::Internal, 2)
    );
    let leaves = thin_leaves(&dev, 1);
    let key = root_node.keys[1];
    (dev, md, root, leaves, key)
}

/// The highest metadata block, which a small pool never allocates.
fn free_metadata_block(dev: &MemMetaDevice) -> u64 {
    let b = superblock(dev).metadata_sm_root.nr_blocks - 1;
    assert_eq!(bitmap_count(dev, metadata_bitmaps(dev)[0].blocknr, b), 0);
    b
}

#[test]
fn flipped_byte_in_a_leaf_is_a_checksum_error_there() {
    let (dev, _md, root, leaves, _) = two_leaf_thin();
    let leaf = leaves[1].0;
    dev.patch(leaf, 1000, &[0x5a]).unwrap();
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::Checksum, leaf);
    assert_eq!(p.thin, Some(1));
    assert_eq!(&p.path[p.path.len() - 2..], &[root, leaf]);
    assert!(p.key_range.is_some());
    // Its data blocks now look leaked; its thin's mapping count is not judged.
    assert!(r.of_kind(ProblemKind::DataRefCount).count() > 0);
    assert_eq!(r.of_kind(ProblemKind::MappedBlocksMismatch).count(), 0);
}

#[test]
fn keys_out_of_order_under_a_valid_checksum() {
    let (dev, _md, _root, leaves, _) = two_leaf_thin();
    let (leaf, mut node) = leaves[0].clone();
    node.keys.swap(10, 11);
    write_node(&dev, leaf, &node);
    let p = expect_at(&check_dev(&dev), ProblemKind::KeyOrder, leaf);
    assert!(p.detail.contains("entry 11"), "{p}");
}

#[test]
fn misdirected_node_is_a_block_number_error() {
    let (dev, _md, _root, leaves, _) = two_leaf_thin();
    let (leaf, node) = leaves[0].clone();
    dev.patch(leaf, 0, &node.encode(leaf + 1)[..]).unwrap();
    expect_at(&check_dev(&dev), ProblemKind::BlockNumber, leaf);
}

#[test]
fn underfull_leaf_and_bad_parent_keys() {
    let (dev, _md, _root, leaves, key) = two_leaf_thin();
    let (l0, mut n0) = leaves[0].clone();
    let (l1, mut n1) = leaves[1].clone();
    // Second leaf: keep 10 entries, and start it below its parent's key.
    n1.keys.truncate(10);
    n1.values.truncate(80);
    assert!(n1.keys[0] == key && n0.keys.last().unwrap() + 1 < key);
    n1.keys[0] = key - 1;
    write_node(&dev, l1, &n1);
    // First leaf: end at the second leaf's key.
    *n0.keys.last_mut().unwrap() = key;
    write_node(&dev, l0, &n0);
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::TooFewEntries, l1);
    assert!(p.detail.contains("10 < 84"), "{p}");
    expect_at(&r, ProblemKind::ParentKey, l1);
    expect_at(&r, ProblemKind::KeyRange, l0);
    let p = r
        .of_kind(ProblemKind::MappedBlocksMismatch)
        .next()
        .expect("mapped blocks");
    assert_eq!(p.thin, Some(1));
}

#[test]
fn cycles_out_of_range_pointers_and_cross_links() {
    let (dev, _md, root, _leaves, _) = two_leaf_thin();
    let mut node = read_node(&dev, root, 8);
    node.set_value(1, &root.to_le_bytes());
    write_node(&dev, root, &node);
    expect_at(&check_dev(&dev), ProblemKind::Cycle, root);

    node.set_value(1, &(1u64 << 40).to_le_bytes());
    write_node(&dev, root, &node);
    let p = expect_at(&check_dev(&dev), ProblemKind::OutOfRange, root);
    assert!(p.detail.contains("1099511627776"), "{p}");

    let details_root = superblock(&dev).device_details_root;
    node.set_value(1, &details_root.to_le_bytes());
    write_node(&dev, root, &node);
    expect_at(&check_dev(&dev), ProblemKind::CrossLinked, details_root);
}

#[test]
fn leaves_at_different_depths() {
    let (dev, _md, root, leaves, key) = two_leaf_thin();
    // An extra level above the second leaf only: a one-entry internal node in a free block.
    let extra = free_metadata_block(&dev);
    let mut inner = Node::new(NodeKind::Internal, 8);
    inner.insert_at(0, key, &leaves[1].0.to_le_bytes());
    write_node(&dev, extra, &inner);
    let mut node = read_node(&dev, root, 8);
    node.set_value(1, &extra.to_le_bytes());
    write_node(&dev, root, &node);
    let r = check_dev(&dev);
    expect_at(&r, ProblemKind::UnevenTree, root);
    expect_at(&r, ProblemKind::TooFewEntries, extra);
    let p = expect_at(&r, ProblemKind::MetadataRefCount, extra);
    assert!(p.detail.contains("in use but free"), "{p}");
}

#[test]
fn bumped_and_dropped_bitmap_counts_name_the_block() {
    let (dev, md) = pool_with_thin(100);
    let meta_bitmap = metadata_bitmaps(&dev)[0].blocknr;
    let free = free_metadata_block(&dev);
    set_bitmap_count(&dev, meta_bitmap, free, 1);
    let root = thin_root(&dev, 1);
    set_bitmap_count(&dev, meta_bitmap, root, 0);
    let data_bitmap = data_bitmaps(&dev)[0].blocknr;
    let d = mapped(&md, 1, 4).0;
    set_bitmap_count(&dev, data_bitmap, d, 2);
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::MetadataRefCount, free);
    assert!(
        p.detail.contains("count 1, but 0") && p.detail.contains("leaked"),
        "{p}"
    );
    let p = expect_at(&r, ProblemKind::MetadataRefCount, root);
    assert!(p.detail.contains("count 0, but 1"), "{p}");
    let p = expect_at(&r, ProblemKind::DataRefCount, data_bitmap);
    assert_eq!(p.data_block, Some(d));
    assert!(p.detail.contains("count 2, but 1"), "{p}");
    // One more block in use than before: the index entry's free count is now a stale hint,
    // which is noted (not damage), beside the one real count problem.
    set_bitmap_count(&dev, meta_bitmap, root, 1);
    let r = check_dev(&dev);
    let index = superblock(&dev).metadata_sm_root.bitmap_root;
    assert!(
        r.notes
            .iter()
            .any(|n| n.kind == ProblemKind::SpaceMapIndex && n.block == Some(index)),
        "{r:?}"
    );
    assert_eq!(r.of_kind(ProblemKind::MetadataRefCount).count(), 1, "{r}");
}

/// Deletes the entry for `key` from the ref-count tree at `root`; returns the leaf.
fn delete_ref_count(dev: &MemMetaDevice, root: u64, key: u64) -> u64 {
    let (leaf, mut node) = nodes(dev, root, 4)
        .into_iter()
        .find(|(_, n)| n.kind == NodeKind::Leaf && n.keys.contains(&key))
        .expect("entry present");
    let i = node.keys.binary_search(&key).unwrap();
    node.remove_at(i);
    write_node(dev, leaf, &node);
    leaf
}

#[test]
fn deleted_ref_count_entries() {
    let (dev, md) = pool_with_thin(100);
    // Five snapshots share thin 1's one-leaf tree (count 6); two of them write, which
    // copies the leaf twice: its other data blocks reach count 3, the shared root stays at 4.
    for snap in 2..=6 {
        md.create_snap(ThinId(snap), ThinId(1)).unwrap();
    }
    write(&md, 2, 0);
    write(&md, 3, 0);
    md.commit().unwrap();
    let sb = superblock(&dev);
    let d = mapped(&md, 1, 2).0;
    let root = thin_root(&dev, 4);
    assert_eq!(md.data_block_count(DataBlock(d)), 3);
    let data_leaf = delete_ref_count(&dev, sb.data_sm_root.ref_count_root, d);
    let meta_leaf = delete_ref_count(&dev, sb.metadata_sm_root.ref_count_root, root);
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::RefCountTree, data_bitmaps(&dev)[0].blocknr);
    assert_eq!(p.key_range, Some((d, d + 1)));
    let p = expect_at(
        &r,
        ProblemKind::RefCountTree,
        metadata_bitmaps(&dev)[0].blocknr,
    );
    assert_eq!(p.key_range, Some((root, root + 1)));
    assert!(data_leaf != meta_leaf);
}

#[test]
fn details_that_disagree_with_the_mappings() {
    let (dev, md) = pool_with_thin(100);
    md.create_thin(ThinId(2)).unwrap();
    md.commit().unwrap();
    let details_root = superblock(&dev).device_details_root;
    let mut node = read_node(&dev, details_root, 24);
    let mut d = DeviceDetails::decode(node.value(0));
    d.mapped_blocks += 1;
    node.set_value(0, &d.encode());
    node.remove_at(1);
    write_node(&dev, details_root, &node);
    let r = check_dev(&dev);
    let p = expect_at(&r, ProblemKind::MappedBlocksMismatch, thin_root(&dev, 1));
    assert_eq!(p.thin, Some(1));
    assert!(p.detail.contains("101") && p.detail.contains("100"), "{p}");
    let p = r
        .of_kind(ProblemKind::DetailsMismatch)
        .next()
        .expect("thin 2 reported");
    assert_eq!(p.thin, Some(2));
}

#[test]
fn mapping_past_the_data_device() {
    let (dev, _md) = pool_with_thin(100);
    let (leaf, mut node) = thin_leaves(&dev, 1)[0].clone();
    node.set_value(5, &pack_block_time(100_007, 0).to_le_bytes());
    write_node(&dev, leaf, &node);
    let p = expect_at(&check_dev(&dev), ProblemKind::OutOfRange, leaf);
    assert_eq!(p.data_block, Some(100_007));
}

#[test]
fn two_problems_far_apart_are_both_reported() {
    let (dev, _md, _root, leaves, _) = two_leaf_thin();
    let data_bitmap = data_bitmaps(&dev)[0].blocknr;
    dev.patch(leaves[0].0, 3000, &[1]).unwrap();
    dev.patch(data_bitmap, 3000, &[1]).unwrap();
    let r = check_dev(&dev);
    expect_at(&r, ProblemKind::Checksum, leaves[0].0);
    expect_at(&r, ProblemKind::BitmapChecksum, data_bitmap);
}

#[test]
fn index_entry_with_wrong_free_count_is_a_note_not_damage() {
    let (dev, _md) = pool_with_thin(100);
    let index_root = superblock(&dev).data_sm_root.bitmap_root;
    let mut node = read_node(&dev, index_root, 16);
    let mut e = IndexEntry::decode(node.value(0));
    e.nr_free -= 1;
    node.set_value(0, &e.encode());
    write_node(&dev, index_root, &node);
    // A search hint the kernel tolerates (and thin_check ignores): noted, not damage.
    let r = check_dev(&dev);
    assert!(r.is_clean(), "{r}");
    let note = r
        .notes
        .iter()
        .find(|n| n.kind == ProblemKind::SpaceMapIndex);
    let note = note.expect("the wrong free count is noted");
    assert_eq!(note.block, Some(index_root));
    assert!(note.detail.contains("free"), "{note}");
}

#[test]
fn damaged_superblock_stops_the_check() {
    let (dev, _md) = pool_with_thin(10);
    dev.patch(0, 100, &[0xee]).unwrap();
    let r = check_dev(&dev);
    assert_eq!(r.problems.len(), 1, "{r}");
    let p = expect_at(&r, ProblemKind::Superblock, 0);
    assert!(p.detail.contains("checksum"), "{p}");
    dev.patch(0, 32, &[0; 8]).unwrap();
    let p = expect_at(&check_dev(&dev), ProblemKind::Superblock, 0);
    assert!(p.detail.contains("magic"), "{p}");
    let blank = MemMetaDevice::new(100);
    let p = expect_at(&check_dev(&blank), ProblemKind::Superblock, 0);
    assert!(p.detail.contains("all zeros"), "{p}");
}

#[test]
fn held_snapshot_damage() {
    let (dev, md) = pool_with_thin(100);
    let held = md.reserve_metadata_snap().unwrap();
    md.commit().unwrap();
    let old_leaf = thin_leaves(&dev, 1)[0].0;
    write(&md, 1, 1); // copies the leaf: the old one is the held snapshot's alone
    md.commit().unwrap();
    assert_clean(&check_dev(&dev), "held snapshot");
    assert_ne!(thin_leaves(&dev, 1)[0].0, old_leaf);
    dev.patch(old_leaf, 2000, &[0x77]).unwrap();
    let p = expect_at(&check_dev(&dev), ProblemKind::Checksum, old_leaf);
    assert!(p.detail.starts_with("held metadata snapshot: "), "{p}");
    dev.patch(held, 200, &[0x77]).unwrap();
    let r = check_dev(&dev);
    expect_at(&r, ProblemKind::Superblock, held);
    // What only the snapshot held now looks leaked.
    expect_at(&r, ProblemKind::MetadataRefCount, old_leaf);
}

#[test]
fn thousands_of_leaks_are_summarised() {
    let (dev, _md) = pool_with_thin(10);
    let meta_bitmap = metadata_bitmaps(&dev)[0].blocknr;
    for b in 2000..4000 {
        set_bitmap_count(&dev, meta_bitmap, b, 1);
    }
    let r = check_dev(&dev);
    assert_eq!(
        r.of_kind(ProblemKind::MetadataRefCount).count(),
        101,
        "100 + summary"
    );
    assert_eq!(r.nr_problems_omitted, 1900);
    assert!(!r.is_clean());
}
