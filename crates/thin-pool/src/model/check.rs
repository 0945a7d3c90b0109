//! The checks of a quiescent pool against the model.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use block_io::data::{rt, IoBuf};
use block_io::MetaDevice;
use parking_lot::Mutex;
use thin_metadata::{Lookup, ThinId, VBlock};

use super::devices::{GrowableMeta, JitterDevice};
use super::state::{describe, Model, Version, OPEN};
use super::Setup;
use crate::{Pool, PoolError};

/// Waits for the background to finish (with a time limit), settles what the model could not
/// tell, and checks every thin, the per-thin and pool counts against the model.
pub(super) fn quiesce_and_check(
    pool: &Arc<Pool>,
    dev: &Arc<JitterDevice>,
    meta: &GrowableMeta,
    model: &Mutex<Model>,
    phase: u64,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            pool.wait_idle();
            let _ = tx.send(());
        })
    };
    let start = std::time::Instant::now();
    loop {
        // Deleted thins cannot be freed while metadata is low: grow it, as an operator would.
        let s = pool.status();
        let cap = meta.inner.nr_blocks();
        if s.free_metadata_blocks < s.metadata_reserve_blocks + 128 && s.nr_metadata_blocks < cap {
            let to = (s.nr_metadata_blocks + 128).min(cap);
            meta.visible.fetch_max(to, Ordering::SeqCst);
            pool.grow_metadata(to).expect("grow the metadata");
            model.lock().summary.metadata_grows += 1;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => break,
            Err(_) if start.elapsed() < Duration::from_secs(60) => {}
            Err(_) => panic!(
                "phase {phase}: the pool's background work never finished: {:#?}",
                pool.status()
            ),
        }
    }
    waiter.join().expect("the idle waiter");
    let bs = pool.geometry().block_size_bytes;

    let mut m = model.lock();
    let md = pool.metadata();
    let mut ids: Vec<u32> = m.thins.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(
        pool.thins(),
        ids,
        "phase {phase}: the pool's thins differ from the model's"
    );
    let nv = m.nr_vblocks;
    let mut data_blocks = BTreeSet::new();
    for (&id, blocks) in m.thins.iter_mut() {
        let thin = pool.open_thin(id).expect("open a thin to check it");
        for (v, block) in blocks.iter_mut().enumerate() {
            let look = md
                .lookup(ThinId(id), VBlock(v as u64))
                .expect("metadata lookup");
            let mapped = matches!(look, Lookup::Provisioned { .. });
            let cur = block.versions.last_mut().expect("a version");
            match cur.prov {
                None => cur.prov = Some(mapped),
                Some(p) if p != mapped => panic!(
                    "phase {phase}: thin {id} block {v}: the model says mapped={p}, the \
                     metadata says {look:?}"
                ),
                Some(_) => {}
            }
            let (r, buf) = rt::block_on(thin.read(dev, v as u64 * bs, IoBuf::new(bs as usize)));
            r.unwrap_or_else(|e| panic!("phase {phase}: read thin {id} block {v}: {e:?}"));
            if !cur.matches(0, &buf) {
                panic!(
                    "phase {phase}: thin {id} block {v} reads wrong when quiescent ({})",
                    describe(cur, 0, &buf)
                );
            }
            // Only the current version matters from now on.
            let last = cur.clone();
            block.versions = vec![Version {
                from: 0,
                until: OPEN,
                ..last
            }];
        }
        for (_, d) in md
            .mappings_in(ThinId(id), VBlock(0), VBlock(u64::MAX), usize::MAX)
            .expect("mappings")
        {
            data_blocks.insert(d.0);
        }
        let beyond = md
            .mappings_in(ThinId(id), VBlock(nv), VBlock(u64::MAX), 1)
            .expect("mappings");
        assert!(
            beyond.is_empty(),
            "phase {phase}: thin {id} maps blocks past those written: {beyond:?}"
        );
    }
    let status = pool.status();
    for t in &status.thins {
        let want = m.thins[&t.id]
            .iter()
            .filter(|b| b.current().prov == Some(true))
            .count() as u64;
        assert_eq!(
            t.mapped_blocks, want,
            "phase {phase}: thin {} mapped_blocks differs from the model",
            t.id
        );
    }
    assert_eq!(
        status.deleting_blocks, 0,
        "phase {phase}: deleted thins not freed when idle"
    );
    assert_eq!(
        status.used_data_blocks,
        data_blocks.len() as u64,
        "phase {phase}: used data blocks differ from the distinct blocks the thins map \
         (a leak, or a block counted twice): {status:#?}"
    );
    drop(m);
}

/// A full-block write to an unprovisioned block must succeed exactly when a data block is
/// free (or ready in the reserve), unless metadata is low.
pub(super) fn probe(
    pool: &Pool,
    dev: &Arc<JitterDevice>,
    model: &Mutex<Model>,
    st: &Setup,
    phase: u64,
) {
    let target = {
        let m = model.lock();
        m.thins.iter().find_map(|(&id, blocks)| {
            blocks
                .iter()
                .position(|b| b.current().prov == Some(false))
                .map(|v| (id, v as u64))
        })
    };
    let Some((id, v)) = target else { return };
    let s = pool.status();
    let free = s.free_data_blocks + s.reserve_ready;
    let meta_low = s.free_metadata_blocks < s.metadata_reserve_blocks + 64;
    let thin = pool.open_thin(id).expect("open for the probe");
    let data = {
        let mut m = model.lock();
        m.summary.probes += 1;
        let seq = m.tick();
        Model::stamp(seq, st.bs as usize)
    };
    let (r, _) = rt::block_on(thin.write(dev, v * st.bs, IoBuf::from_slice(&data), false));
    match (r, free > 0) {
        (Ok(()), true) => {
            let mut m = model.lock();
            let e = m.tick();
            m.block(id, v).settle(
                e,
                Version {
                    from: e,
                    until: OPEN,
                    bytes: Some(data.into()),
                    prov: Some(true),
                },
            );
        }
        (Err(PoolError::NoDataSpace), false) => {}
        (Err(PoolError::NoMetadataSpace), _) if meta_low => {}
        (r, _) => panic!(
            "phase {phase}: probe write to thin {id} block {v} with {free} free blocks \
             (free {} + reserve {}): {r:?}; {s:#?}",
            s.free_data_blocks, s.reserve_ready
        ),
    }
}
