//! The concurrency contract of `ThinMetadata`: lookups on several threads run while one
//! writer inserts, overwrites and commits, and every lookup sees a state the writer made.
//!
//! The writer maps virtual block `v` to a data block whose number it records in a shared
//! table before inserting; a reader that finds a mapping checks the data block is one the
//! writer assigned to `v` at some point (blocks are never reused here: the data space is
//! large enough). A reader must never see a mapping for a block the writer has not
//! touched, nor an error.

use block_io::MemMetaDevice;
use parking_lot::Mutex;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use thin_metadata::{DataBlock, FormatOptions, Lookup, ThinId, ThinMetadata, VBlock};

#[test]
fn lookups_run_against_a_writer_and_commits() {
    let dev = Arc::new(MemMetaDevice::new(8192));
    let opts = FormatOptions {
        data_block_size_sectors: 128,
        nr_data_blocks: 1 << 20,
    };
    let md = Arc::new(ThinMetadata::format(dev, opts).expect("format"));
    md.create_thin(ThinId(1)).expect("create");
    md.commit().expect("commit");
    // vblock -> every data block ever assigned to it.
    let assigned: Arc<Mutex<HashMap<u64, HashSet<u64>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (md, assigned, stop, lookups) =
                (md.clone(), assigned.clone(), stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(r);
                while !stop.load(Ordering::Relaxed) {
                    let v = rng.gen_range(0..20_000u64);
                    match md.lookup(ThinId(1), VBlock(v)).expect("lookup never fails") {
                        Lookup::Unprovisioned => {}
                        Lookup::Provisioned { data_block, shared } => {
                            assert!(!shared, "nothing is shared in this test");
                            let ok = assigned
                                .lock()
                                .get(&v)
                                .is_some_and(|s| s.contains(&data_block.0));
                            assert!(
                                ok,
                                "vblock {v} maps to {data_block:?}, never assigned to it"
                            );
                        }
                    }
                    lookups.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(99);
    for i in 0..60_000u64 {
        let v = rng.gen_range(0..20_000u64);
        let b: DataBlock = md.alloc_data_block().expect("alloc");
        assigned.lock().entry(v).or_default().insert(b.0);
        md.insert(ThinId(1), VBlock(v), b).expect("insert");
        if i % 5_000 == 0 {
            md.commit().expect("commit");
        }
        if i % 7_000 == 0 {
            md.remove_range(ThinId(1), VBlock(v), VBlock(v + 500))
                .expect("discard");
        }
    }
    md.commit().expect("final commit");
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader panicked");
    }
    assert!(
        lookups.load(Ordering::Relaxed) > 1000,
        "readers made progress"
    );
}
