//! A quick randomized model test: thins as BTreeMaps of vblock -> data-block identity.
use block_io::MemMetaDevice;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use thin_metadata::*;

#[test]
fn quick_model() {
    let n: u64 = std::env::var("QM_SEEDS").map_or(20, |s| s.parse().unwrap());
    let ops: usize = std::env::var("QM_OPS").map_or(3000, |s| s.parse().unwrap());
    for seed in 0..n {
        run(seed, ops);
    }
}

fn run(seed: u64, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dev = Arc::new(MemMetaDevice::new(16384));
    let mut md = ThinMetadata::format(
        dev.clone(),
        FormatOptions {
            data_block_size_sectors: 128,
            nr_data_blocks: 200000,
        },
    )
    .unwrap();
    // model: thin -> vblock -> token; token identifies the data written (data block identity irrelevant)
    let mut model: BTreeMap<u32, BTreeMap<u64, u64>> = BTreeMap::new();
    // data block -> token (content) for checking mapping correctness
    let mut content: HashMap<u64, u64> = HashMap::new();
    let mut committed = (model.clone(), content.clone());
    let mut token = 0u64;
    let vmax: u64 = std::env::var("QM_VMAX").map_or(2000, |s| s.parse().unwrap());
    for op in 0..ops {
        let r = rng.gen_range(0..100);
        let ids: Vec<u32> = model.keys().copied().collect();
        if r < 3 || ids.is_empty() {
            let id = rng.gen_range(0..8);
            if model.contains_key(&id) {
                continue;
            }
            md.create_thin(ThinId(id)).unwrap();
            model.insert(id, BTreeMap::new());
        } else if r < 6 {
            let id = rng.gen_range(0..8);
            let o = ids[rng.gen_range(0..ids.len())];
            if model.contains_key(&id) {
                continue;
            }
            md.create_snap(ThinId(id), ThinId(o)).unwrap();
            let m = model[&o].clone();
            model.insert(id, m);
        } else if r < 8 {
            let id = ids[rng.gen_range(0..ids.len())];
            md.delete_thin(ThinId(id)).unwrap();
            model.remove(&id);
        } else if r < 70 {
            // write: copy-on-write semantics like the pool
            let id = ids[rng.gen_range(0..ids.len())];
            let v = rng.gen_range(0..vmax);
            token += 1;
            match md.lookup(ThinId(id), VBlock(v)).unwrap() {
                Lookup::Provisioned {
                    data_block,
                    shared: false,
                } => {
                    content.insert(data_block.0, token);
                }
                _ => {
                    let b = md.alloc_data_block().unwrap();
                    md.insert(ThinId(id), VBlock(v), b).unwrap();
                    content.insert(b.0, token);
                }
            }
            model.get_mut(&id).unwrap().insert(v, token);
        } else if r < 80 {
            let id = ids[rng.gen_range(0..ids.len())];
            let b = rng.gen_range(0..vmax);
            let e = b + rng.gen_range(1..300u64);
            let n = md.remove_range(ThinId(id), VBlock(b), VBlock(e)).unwrap();
            let m = model.get_mut(&id).unwrap();
            let keys: Vec<u64> = m.range(b..e).map(|(k, _)| *k).collect();
            assert_eq!(n, keys.len() as u64, "seed {seed} op {op}");
            for k in keys {
                m.remove(&k);
            }
        } else if r < 88 {
            md.commit().unwrap();
            committed = (model.clone(), content.clone());
        } else if r < 90 {
            md.abort().unwrap();
            model = committed.0.clone();
            content = committed.1.clone();
        } else if r < 92 {
            md.commit().unwrap();
            committed = (model.clone(), content.clone());
            md = ThinMetadata::open(dev.clone()).unwrap();
        } else {
            // verify a thin fully
            let id = ids[rng.gen_range(0..ids.len())];
            verify(&md, id, &model[&id], &content, seed, op);
        }
    }
    md.commit().unwrap();
    for (id, m) in &model {
        verify(&md, *id, m, &content, seed, ops);
    }
    // refcount exactness: every data block's count = number of thins mapping it, path sharing aside
    let img = dev.to_bytes();
    let p = format!("/tmp/quick_model_{seed}");
    std::fs::write(&p, &img).unwrap();
    let out = std::process::Command::new("thin_check").arg(&p).output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "seed {seed}: thin_check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_file(&p);
}

fn verify(
    md: &ThinMetadata,
    id: u32,
    m: &BTreeMap<u64, u64>,
    content: &HashMap<u64, u64>,
    seed: u64,
    op: usize,
) {
    let mut seen = 0;
    md.for_each_mapping(ThinId(id), VBlock(0), |v, b, _| {
        let want = m.get(&v.0);
        assert_eq!(
            want.copied(),
            content.get(&b.0).copied(),
            "seed {seed} op {op} thin {id} v {}",
            v.0
        );
        seen += 1;
        true
    })
    .unwrap();
    assert_eq!(seen, m.len(), "seed {seed} op {op} thin {id}");
    assert_eq!(
        md.details(ThinId(id)).unwrap().mapped_blocks,
        m.len() as u64,
        "seed {seed} op {op}"
    );
}
