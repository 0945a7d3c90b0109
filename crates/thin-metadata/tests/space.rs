//! Running out of space: changes are refused cleanly before metadata runs out, the
//! reserve always lets a commit finish, and nothing already committed is lost.

use block_io::MemMetaDevice;
use std::sync::Arc;
use thin_metadata::{DataBlock, Error, FormatOptions, Space, ThinId, ThinMetadata, VBlock};

fn pool(meta_blocks: u64, data_blocks: u64) -> (Arc<MemMetaDevice>, ThinMetadata) {
    let dev = Arc::new(MemMetaDevice::new(meta_blocks));
    let opts = FormatOptions {
        data_block_size_sectors: 128,
        nr_data_blocks: data_blocks,
    };
    let md = ThinMetadata::format(dev.clone(), opts).expect("format");
    (dev, md)
}

#[test]
fn metadata_exhaustion_refuses_changes_but_commits_still_work() {
    let (dev, md) = pool(512, 1_000_000);
    md.create_thin(ThinId(0)).expect("create");
    let mut mapped = 0u64;
    let err = loop {
        let b = md.alloc_data_block().expect("data is plentiful");
        // Spread the keys so that every insert needs leaves of its own eventually.
        match md.insert(ThinId(0), VBlock(mapped * 7), b) {
            Ok(()) => mapped += 1,
            Err(e) => {
                md.release_data_block(b).expect("give the block back");
                break e;
            }
        }
        if mapped.is_multiple_of(1000) {
            md.commit()
                .expect("commits keep working while space shrinks");
        }
    };
    assert!(matches!(err, Error::NoSpace(Space::Metadata)), "got {err}");
    md.commit().expect("the reserve lets the commit finish");
    let md = ThinMetadata::open(dev).expect("reopen");
    assert_eq!(
        md.details(ThinId(0)).expect("details").mapped_blocks,
        mapped
    );
    let mut n = 0;
    md.for_each_mapping(ThinId(0), VBlock(0), |v, _, _| {
        assert_eq!(v.0 % 7, 0);
        n += 1;
        true
    })
    .expect("walk");
    assert_eq!(n, mapped);
}

#[test]
fn huge_discard_of_a_shared_tree_stops_cleanly_when_metadata_runs_low() {
    let (dev, md) = pool(600, 1_000_000);
    md.create_thin(ThinId(0)).expect("create");
    let mut mapped = 0u64;
    // Fill until metadata is about half used.
    while md.status().nr_free_metadata_blocks > 330 {
        let b = md.alloc_data_block().expect("data");
        md.insert(ThinId(0), VBlock(mapped), b).expect("insert");
        mapped += 1;
        if mapped.is_multiple_of(2000) {
            md.commit().expect("commit");
        }
    }
    md.create_snap(ThinId(1), ThinId(0))
        .expect("snapshot shares every leaf");
    md.commit().expect("commit");
    // Punching every other block of the snapshot copies each leaf it touches.
    let mut removed = 0;
    let mut stopped = false;
    for v in (0..mapped).step_by(2) {
        match md.remove_range(ThinId(1), VBlock(v), VBlock(v + 1)) {
            Ok(n) => removed += n,
            Err(Error::NoSpace(Space::Metadata)) => {
                stopped = true;
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(stopped, "metadata should have run low");
    assert_eq!(
        md.details(ThinId(1)).expect("details").mapped_blocks,
        mapped - removed
    );
    md.commit().expect("the trees are consistent: commit works");
    let md = ThinMetadata::open(dev).expect("reopen");
    assert_eq!(
        md.details(ThinId(0)).expect("origin").mapped_blocks,
        mapped,
        "origin intact"
    );
    assert_eq!(
        md.details(ThinId(1)).expect("snap").mapped_blocks,
        mapped - removed
    );
}

#[test]
fn data_exhaustion_is_no_space_data_and_grow_resumes() {
    let (_dev, md) = pool(256, 10);
    md.create_thin(ThinId(0)).expect("create");
    let blocks: Vec<DataBlock> = (0..10)
        .map(|_| md.alloc_data_block().expect("alloc"))
        .collect();
    assert!(matches!(
        md.alloc_data_block(),
        Err(Error::NoSpace(Space::Data))
    ));
    md.release_data_block(blocks[3]).expect("release");
    assert!(
        matches!(md.alloc_data_block(), Err(Error::NoSpace(Space::Data))),
        "a block freed in this transaction is not reused before the commit"
    );
    md.commit().expect("commit");
    assert_eq!(
        md.alloc_data_block().expect("reusable after commit"),
        blocks[3]
    );
    md.grow_data(20).expect("grow");
    assert_eq!(md.alloc_data_block().expect("new space").0, 10);
    assert!(md.grow_data(5).is_err(), "shrinking is refused");
}
