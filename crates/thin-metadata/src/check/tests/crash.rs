//! Crash images check clean: a commit that fails at its first or second flush leaves the
//! durable state plus any subset of the unflushed writes, some torn; whatever survives must
//! be the old or the new transaction, intact. The checker is the judge here, independent of
//! the code that wrote the images. (Kept small: making crash images is slow in debug builds.)

use super::*;
use block_io::{Fault, FaultyMetaDevice};

#[test]
fn crash_images_check_clean() {
    for seed in seeds(0..3) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut dev = Arc::new(FaultyMetaDevice::new(512));
        let opts = FormatOptions {
            data_block_size_sectors: 128,
            nr_data_blocks: 20_000,
        };
        let mut md = ThinMetadata::format(dev.clone(), opts).unwrap();
        let mut model = Model::new();
        for round in 0..8 {
            for _ in 0..rng.gen_range(1..150) {
                random_op(&md, &mut model, &mut rng, 400);
            }
            if rng.gen_bool(0.1) && md.status().held_root.is_none() {
                md.reserve_metadata_snap().unwrap();
            }
            dev.add_fault(Fault::NthFlush(rng.gen_range(1..=2)));
            assert!(
                md.commit().is_err(),
                "seed {seed} round {round}: commit must fail"
            );
            dev.clear_faults();
            let mut survivor = None;
            for k in 0..2 {
                let image = dev.crash_image(seed * 1000 + round * 10 + k);
                let r = check_dev(&image);
                assert_clean(&r, &format!("seed {seed} round {round} crash image {k}"));
                survivor = Some(image);
            }
            // Go on from the last crash image, as a restarted pool would.
            let image = survivor.expect("an image");
            dev = Arc::new(FaultyMetaDevice::from_image(&image));
            md = ThinMetadata::open(dev.clone()).unwrap();
            model = md
                .thins()
                .into_iter()
                .map(|t| {
                    let mut vblocks = BTreeSet::new();
                    md.for_each_mapping(t, VBlock(0), |v, _, _| {
                        vblocks.insert(v.0);
                        true
                    })
                    .unwrap();
                    (t.0, vblocks)
                })
                .collect();
        }
    }
}
