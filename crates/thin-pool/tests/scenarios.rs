//! Issue 5's named scenarios, each on a small in-memory pool: out of data space (both policies,
//! then grow and resume), metadata low, discard passdown with shared blocks, snapshot under
//! write load, delete of a large thin beside a busy one, the read-only latch, group commit,
//! FUA without commit, the pre-zeroed reserve and its re-zeroing at open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::data::{rt, DataGeometry, IoBuf, MemDataDevice};
use block_io::{Fault, FaultyMetaDevice, MemMetaDevice, MetaDevice};
use thin_metadata::check::{check, CheckOptions};
use thin_metadata::VBlock;
use thin_pool::{NoSpacePolicy, Pool, PoolConfig, PoolError, PoolEvent, PoolMode, RESERVE_THIN};

const KIB: u64 = 1024;

struct Rig {
    pool: Pool,
    data: Arc<MemDataDevice>,
    meta: Arc<dyn MetaDevice>,
}

/// A pool of `nr_blocks` blocks of `bs` bytes on a data device twice that size (room to
/// grow), with metadata on `meta`.
fn rig_on(meta: Arc<dyn MetaDevice>, bs: u64, nr_blocks: u64, cfg: PoolConfig) -> Rig {
    let geo = DataGeometry::new(bs, nr_blocks * 2, 4096).unwrap();
    let data = Arc::new(MemDataDevice::new(geo));
    let d = data.clone();
    let pool = Pool::format(meta.clone(), nr_blocks, cfg, move || Ok(d.clone())).unwrap();
    Rig { pool, data, meta }
}

fn rig(bs: u64, nr_blocks: u64, cfg: PoolConfig) -> Rig {
    rig_on(Arc::new(MemMetaDevice::new(1024)), bs, nr_blocks, cfg)
}

fn reopen(r: Rig, cfg: PoolConfig) -> Rig {
    let Rig { pool, data, meta } = r;
    pool.close().unwrap();
    let d = data.clone();
    let pool = Pool::open(meta.clone(), cfg, move || Ok(d.clone())).unwrap();
    Rig { pool, data, meta }
}

fn assert_clean(meta: &dyn MetaDevice) {
    let report = check(meta, &CheckOptions::default());
    assert!(
        report.problems.is_empty(),
        "metadata check found problems: {:#?}",
        report.problems
    );
}

/// Closes the pool (its final commit included) and checks what it left on disk.
fn close_and_check(r: Rig) {
    let Rig { pool, meta, .. } = r;
    pool.close().unwrap();
    assert_clean(&*meta);
}

fn errno<T: std::fmt::Debug>(r: Result<T, PoolError>) -> i32 {
    r.expect_err("expected an error").errno()
}

#[test]
fn out_of_space_error_mode_then_grow_resumes() {
    let cfg = PoolConfig {
        reserve_blocks: 0,
        no_space: NoSpacePolicy::Error,
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 16, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    rt::block_on(async {
        for b in 0..16 {
            let (res, _) = t
                .write(&r.data, b * bs, IoBuf::filled(bs as usize, 1), false)
                .await;
            res.unwrap();
        }
        let (res, _) = t
            .write(&r.data, 16 * bs, IoBuf::filled(4096, 2), false)
            .await;
        assert_eq!(errno(res), 28, "a write needing a block gets ENOSPC");
        assert_eq!(r.pool.mode(), PoolMode::OutOfDataSpace);
        // Reads and overwrites go on.
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 3), false).await;
        res.unwrap();
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(8192)).await;
        res.unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 3) && buf[4096..].iter().all(|&b| b == 1));
        r.pool.grow_data(32).unwrap();
        assert_eq!(
            r.pool.mode(),
            PoolMode::Write,
            "a grow ends out-of-space at once"
        );
        let (res, _) = t
            .write(&r.data, 16 * bs, IoBuf::filled(4096, 2), false)
            .await;
        res.unwrap();
        assert_eq!(r.pool.mode(), PoolMode::Write);
        t.flush(&r.data).await.unwrap();
    });
    assert!(r.pool.status().stats.no_space_errors >= 1);
    drop(t);
    let r = reopen(r, PoolConfig::default());
    assert_eq!(r.pool.status().nr_data_blocks, 32);
    close_and_check(r);
}

#[test]
fn out_of_space_queue_mode_waits_for_grow_and_times_out() {
    let cfg = PoolConfig {
        reserve_blocks: 0,
        no_space: NoSpacePolicy::Queue {
            timeout: Duration::from_secs(30),
        },
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 4, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    let pool = &r.pool;
    let grown = AtomicBool::new(false);
    std::thread::scope(|scope| {
        rt::block_on(async {
            for b in 0..4 {
                let (res, _) = t
                    .write(&r.data, b * bs, IoBuf::filled(4096, 1), false)
                    .await;
                res.unwrap();
            }
        });
        scope.spawn(|| {
            // Grow once the write is queued.
            while pool.status().stats.no_space_waits == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            grown.store(true, Ordering::SeqCst);
            pool.grow_data(8).unwrap();
        });
        rt::block_on(async {
            let (res, _) = t
                .write(&r.data, 5 * bs, IoBuf::filled(4096, 9), false)
                .await;
            res.unwrap();
        });
        assert!(
            grown.load(Ordering::SeqCst),
            "the write completed only after the grow"
        );
    });
    assert_eq!(r.pool.mode(), PoolMode::Write);
    drop(t);
    drop(r);

    // With a short timeout, a queued write fails with ENOSPC when it runs out.
    let cfg = PoolConfig {
        reserve_blocks: 0,
        no_space: NoSpacePolicy::Queue {
            timeout: Duration::from_millis(200),
        },
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 2, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    rt::block_on(async {
        for b in 0..2 {
            let (res, _) = t
                .write(&r.data, b * bs, IoBuf::filled(4096, 1), false)
                .await;
            res.unwrap();
        }
        let t0 = Instant::now();
        let (res, _) = t
            .write(&r.data, 2 * bs, IoBuf::filled(4096, 1), false)
            .await;
        assert_eq!(errno(res), 28);
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "it waited for the timeout"
        );
    });
}

#[test]
fn a_discard_frees_space_for_queued_writes() {
    let cfg = PoolConfig {
        reserve_blocks: 0,
        no_space: NoSpacePolicy::Queue {
            timeout: Duration::from_secs(30),
        },
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 4, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    rt::block_on(async {
        for b in 0..4 {
            let (res, _) = t
                .write(&r.data, b * bs, IoBuf::filled(4096, 1), false)
                .await;
            res.unwrap();
        }
        t.flush(&r.data).await.unwrap();
        // One task queues for space, another discards two blocks.
        let writer = async {
            let (res, _) = t
                .write(&r.data, 10 * bs, IoBuf::filled(4096, 5), false)
                .await;
            res
        };
        let discarder = async {
            while r.pool.status().stats.no_space_waits == 0 {
                rt::sleep(Duration::from_millis(5)).await;
            }
            t.discard(&r.data, 0, 2 * bs).await
        };
        let out = rt::join_all([
            Box::pin(writer) as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>,
            Box::pin(discarder),
        ])
        .await;
        for o in out {
            o.unwrap();
        }
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(bs as usize)).await;
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 0), "discarded blocks read zero");
    });
}

#[test]
fn metadata_low_refuses_provisioning_but_keeps_commits_working() {
    let lows = Arc::new(AtomicU64::new(0));
    let l = lows.clone();
    let cfg = PoolConfig {
        reserve_blocks: 0,
        no_space: NoSpacePolicy::Error,
        on_event: Some(Arc::new(move |e: &PoolEvent| {
            if matches!(e, PoolEvent::MetadataLow { .. }) {
                l.fetch_add(1, Ordering::SeqCst);
            }
        })),
        ..PoolConfig::default()
    };
    // 96 metadata blocks hold far fewer mappings than 16384 data blocks of 4 KiB.
    let r = rig_on(Arc::new(MemMetaDevice::new(96)), 4 * KIB, 16384, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let mut written = 0u64;
    rt::block_on(async {
        loop {
            // Scattered keys make many leaves.
            let v = written * 7919 % 16384;
            let (res, _) = t
                .write(&r.data, v * 4096, IoBuf::filled(4096, 1), false)
                .await;
            match res {
                Ok(()) => written += 1,
                Err(e) => {
                    assert_eq!(e.errno(), 28, "metadata low is ENOSPC, not {e}");
                    assert!(matches!(e, PoolError::NoMetadataSpace), "{e}");
                    break;
                }
            }
            assert!(written < 16384, "metadata never ran low");
        }
        // Commits still complete, reads and overwrites go on, the pool stays writable.
        t.flush(&r.data).await.unwrap();
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 2), true).await;
        res.unwrap();
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(4096)).await;
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 2));
    });
    assert!(written > 10, "only {written} blocks fitted");
    assert_eq!(r.pool.mode(), PoolMode::Write);
    assert_eq!(lows.load(Ordering::SeqCst), 1, "one MetadataLow event");
    close_and_check(r);
}

#[test]
fn discard_passes_down_only_when_the_last_reference_goes() {
    // Commits happen only where the test asks for them.
    let cfg = PoolConfig {
        commit_interval: Duration::from_secs(3600),
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 64, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    let passed = || r.pool.status().stats.blocks_passed_down;
    rt::block_on(async {
        for b in 0..8 {
            let (res, _) = t
                .write(&r.data, b * bs, IoBuf::filled(bs as usize, 4), false)
                .await;
            res.unwrap();
        }
        r.pool.create_snap(2, 1).await.unwrap();
        let s = r.pool.open_thin(2).unwrap();
        // The origin lets go of blocks 0..4; the snapshot still holds them.
        t.discard(&r.data, 0, 4 * bs).await.unwrap();
        assert_eq!(passed(), 0);
        let (res, buf) = s.read(&r.data, 0, IoBuf::new(4 * bs as usize)).await;
        res.unwrap();
        assert!(
            buf.iter().all(|&b| b == 4),
            "the snapshot still reads its data"
        );
        // The snapshot lets go of block 0 too. Its last reference goes, but the origin's
        // discard is not committed: the last commit still shows it shared, and a crash would
        // bring the origin's mapping back over zeroed data. Nothing is passed down.
        s.discard(&r.data, 0, bs).await.unwrap();
        assert_eq!(passed(), 0);
        // Once the origin's discard is committed, the last reference of block 1 going is the
        // whole story: it is passed down.
        r.pool.commit().await.unwrap();
        s.discard(&r.data, bs, bs).await.unwrap();
        assert_eq!(passed(), 1);
        // A partial-block discard changes nothing.
        s.discard(&r.data, 2 * bs + 4096, 4096).await.unwrap();
        let (res, buf) = s.read(&r.data, 2 * bs, IoBuf::new(bs as usize)).await;
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 4));
        s.flush(&r.data).await.unwrap();
    });
    close_and_check(r);
}

#[test]
fn writes_copy_after_a_snapshot_but_not_once_it_is_deleted_and_committed() {
    let cfg = PoolConfig {
        commit_interval: Duration::from_secs(3600),
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 64, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    let copies = || r.pool.status().stats.copies;
    rt::block_on(async {
        for b in 0..4 {
            let (res, _) = t
                .write(&r.data, b * bs, IoBuf::filled(bs as usize, 1), false)
                .await;
            res.unwrap();
        }
        r.pool.create_snap(2, 1).await.unwrap();
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 2), false).await;
        res.unwrap();
        assert_eq!(copies(), 1, "a write to a shared block copies it");
        r.pool.delete_thin(2).unwrap();
        r.pool.wait_idle();
        // Deleted but not committed: the last commit still shows the snapshot sharing.
        let (res, _) = t.write(&r.data, bs, IoBuf::filled(4096, 2), false).await;
        res.unwrap();
        assert_eq!(copies(), 2, "sharing that ended uncommitted still copies");
        r.pool.commit().await.unwrap();
        let (res, _) = t
            .write(&r.data, 2 * bs, IoBuf::filled(4096, 2), false)
            .await;
        res.unwrap();
        assert_eq!(
            copies(),
            2,
            "once the delete is committed, writes go in place"
        );
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(4 * bs as usize)).await;
        res.unwrap();
        for b in 0..4usize {
            let blk = &buf[b * bs as usize..(b + 1) * bs as usize];
            let want_head = if b < 3 { 2 } else { 1 };
            assert!(blk[..4096].iter().all(|&x| x == want_head), "block {b}");
            assert!(blk[4096..].iter().all(|&x| x == 1), "block {b}");
        }
        t.flush(&r.data).await.unwrap();
    });
    close_and_check(r);
}

#[test]
fn snapshot_under_write_load_captures_a_consistent_point() {
    let r = rig(16 * KIB, 512, PoolConfig::default());
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    const BLOCKS: u64 = 32;
    // Round r writes the byte r into every block; the times of each round's writes are kept.
    let starts: Vec<Vec<AtomicU64>> = (0..BLOCKS)
        .map(|_| (0..256).map(|_| AtomicU64::new(u64::MAX)).collect())
        .collect();
    let ends: Vec<Vec<AtomicU64>> = (0..BLOCKS)
        .map(|_| (0..256).map(|_| AtomicU64::new(u64::MAX)).collect())
        .collect();
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_nanos() as u64;
    let stop = AtomicBool::new(false);
    let (mut snap_start, mut snap_end) = (0, 0);
    rt::block_on(async {
        let writers = (0..BLOCKS).map(|b| {
            let (t, data, starts, ends, stop) = (&t, &r.data, &starts, &ends, &stop);
            async move {
                for round in 1..256u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    starts[b as usize][round as usize].store(now(), Ordering::SeqCst);
                    let buf = IoBuf::filled(4096, round as u8);
                    let (res, _) = t.write(data, b * bs + 4096, buf, false).await;
                    res.unwrap();
                    ends[b as usize][round as usize].store(now(), Ordering::SeqCst);
                    rt::yield_now().await;
                }
            }
        });
        let snapper = async {
            for _ in 0..10 {
                rt::yield_now().await;
            }
            snap_start = now();
            r.pool.create_snap(2, 1).await.unwrap();
            snap_end = now();
            for _ in 0..10 {
                rt::yield_now().await;
            }
            stop.store(true, Ordering::SeqCst);
        };
        let mut all: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = writers
            .map(|f| Box::pin(f) as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>)
            .collect();
        all.push(Box::pin(snapper));
        rt::join_all(all).await;
    });
    let s = r.pool.open_thin(2).unwrap();
    rt::block_on(async {
        for b in 0..BLOCKS {
            let (res, buf) = s.read(&r.data, b * bs + 4096, IoBuf::new(4096)).await;
            res.unwrap();
            let got = u64::from(buf[0]);
            assert!(buf.iter().all(|&x| u64::from(x) == got), "torn block {b}");
            // The round seen must have started before the snapshot ended, and no later round
            // may have completed before the snapshot started.
            let st = |rd: u64| starts[b as usize][rd as usize].load(Ordering::SeqCst);
            let en = |rd: u64| ends[b as usize][rd as usize].load(Ordering::SeqCst);
            if got > 0 {
                assert!(
                    st(got) < snap_end,
                    "block {b}: round {got} started after the snapshot"
                );
            }
            if got < 255 {
                let later = en(got + 1);
                assert!(
                    later == u64::MAX || later > snap_start,
                    "block {b}: round {} finished before the snapshot yet it shows {got}",
                    got + 1
                );
            }
        }
        // Writing the origin after the snapshot leaves the snapshot alone, and the other way.
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 0xAA), false).await;
        res.unwrap();
        let (res, buf) = s.read(&r.data, 0, IoBuf::new(4096)).await;
        res.unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        let (res, _) = s
            .write(&r.data, 4096, IoBuf::filled(4096, 0xBB), false)
            .await;
        res.unwrap();
        let (res, buf) = t.read(&r.data, 4096, IoBuf::new(4096)).await;
        res.unwrap();
        assert!(buf.iter().all(|&x| x != 0xBB));
        t.flush(&r.data).await.unwrap();
        s.flush(&r.data).await.unwrap();
    });
    assert!(
        r.pool.status().stats.copies > 0,
        "writes after the snapshot copied blocks"
    );
    close_and_check(r);
}

#[test]
fn deleting_a_large_thin_frees_it_in_the_background_while_another_stays_busy() {
    let cfg = PoolConfig {
        delete_batch_blocks: 32,
        ..PoolConfig::default()
    };
    let nr = 20_000;
    let r = rig_on(Arc::new(MemMetaDevice::new(4096)), 4 * KIB, nr + 1024, cfg);
    r.pool.create_thin(1).unwrap();
    r.pool.create_thin(2).unwrap();
    {
        let big = r.pool.open_thin(1).unwrap();
        rt::block_on(async {
            let bufs = (0..nr).map(|b| {
                let big = &big;
                let data = &r.data;
                async move {
                    let (res, _) = big
                        .write(data, b * 4096, IoBuf::filled(4096, 1), false)
                        .await;
                    res.unwrap();
                }
            });
            // In chunks, to keep the number of futures in flight reasonable.
            let all: Vec<_> = bufs.collect();
            let mut it = all.into_iter();
            loop {
                let chunk: Vec<_> = it.by_ref().take(256).collect();
                if chunk.is_empty() {
                    break;
                }
                rt::join_all(chunk).await;
            }
            big.flush(&r.data).await.unwrap();
        });
        // Open: refused.
        assert!(matches!(r.pool.delete_thin(1), Err(PoolError::Busy(1))));
    }
    let busy = r.pool.open_thin(2).unwrap();
    r.pool.delete_thin(1).unwrap();
    assert_eq!(r.pool.thins(), vec![2], "a deleted thin disappears at once");
    assert!(r.pool.open_thin(1).is_err());
    let mut worst = Duration::ZERO;
    rt::block_on(async {
        let mut i = 0u64;
        loop {
            if r.pool.status().deleting_blocks == 0 {
                break;
            }
            let t0 = Instant::now();
            let (res, _) = busy
                .write(&r.data, (i % 512) * 4096, IoBuf::filled(4096, 3), false)
                .await;
            res.unwrap();
            let (res, _) = busy.read(&r.data, (i % 512) * 4096, IoBuf::new(4096)).await;
            res.unwrap();
            worst = worst.max(t0.elapsed());
            i += 1;
        }
    });
    r.pool.wait_idle();
    let steps = r.pool.status().stats.delete_steps;
    println!(
        "FIGURE name=pool_delete_busy_thin_worst_op value={} unit=us",
        worst.as_micros()
    );
    assert!(
        steps >= nr / 32,
        "the delete ran in batches of 32 mappings: {steps} steps for {nr} mappings"
    );
    // Generous: a batch holds the metadata lock for about a millisecond.
    assert!(worst < Duration::from_secs(1), "worst op took {worst:?}");
    let st = r.pool.status();
    assert!(
        st.free_data_blocks + st.reserve_ready + 600 >= nr,
        "blocks came back: {st:?}"
    );
    drop(busy);
    let r = reopen(r, PoolConfig::default());
    close_and_check(r);
}

#[test]
fn a_delete_interrupted_by_a_restart_resumes() {
    let r = rig(4 * KIB, 4096, PoolConfig::default());
    r.pool.create_thin(7).unwrap();
    let t = r.pool.open_thin(7).unwrap();
    rt::block_on(async {
        for b in 0..2000 {
            let (res, _) = t
                .write(&r.data, b * 4096, IoBuf::filled(4096, 1), false)
                .await;
            res.unwrap();
        }
        t.flush(&r.data).await.unwrap();
    });
    drop(t);
    let Rig { pool, data, meta } = r;
    pool.delete_thin(7).unwrap();
    // Crash: keep only what is durable right now (the delete is not committed, or it is,
    // either way the reopened pool must be consistent and finish the job).
    drop(pool);
    let d = data.clone();
    let pool = Pool::open(meta.clone(), PoolConfig::default(), move || Ok(d.clone())).unwrap();
    pool.wait_idle();
    assert!(pool.thins().is_empty());
    assert_eq!(pool.status().deleting_blocks, 0);
    pool.close().unwrap();
    assert_clean(&*meta);
}

#[test]
fn a_metadata_write_error_latches_read_only() {
    let fmeta = Arc::new(FaultyMetaDevice::new(512));
    let r = rig_on(fmeta.clone(), 64 * KIB, 64, PoolConfig::default());
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    rt::block_on(async {
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 1), false).await;
        res.unwrap();
        t.flush(&r.data).await.unwrap();
        let (res, _) = t.write(&r.data, 65536, IoBuf::filled(4096, 2), false).await;
        res.unwrap();
        fmeta.add_fault(Fault::NthWrite(1));
        let e = t.flush(&r.data).await.unwrap_err();
        assert_eq!(e.errno(), 5, "the failed commit is EIO: {e}");
        assert_eq!(r.pool.mode(), PoolMode::ReadOnly);
        fmeta.clear_faults();
        // Writes get EIO; reads of committed data go on.
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 9), false).await;
        assert_eq!(errno(res), 5);
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(4096)).await;
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 1));
    });
    let st = r.pool.status();
    // The committer or the worker (whose next change finds the metadata latched) may be the
    // one to report it.
    let why = st.mode_reason.unwrap();
    assert!(
        why.contains("commit failed") || why.contains("earlier write failure"),
        "{why}"
    );
    assert_eq!(st.stats.commit_failures, 1);
    assert!(r.pool.create_thin(5).is_err());
    drop(t);
    drop(r.pool);
    // What reached the disk is the last good commit, and it is clean.
    let image = fmeta.durable_image();
    assert_clean(&image);
}

#[test]
fn concurrent_flushes_share_commits_and_fua_overwrites_skip_them() {
    // No periodic commit and no background refills: every commit below is a flush's.
    let cfg = PoolConfig {
        reserve_blocks: 0,
        commit_interval: Duration::from_secs(3600),
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 256, cfg);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    rt::block_on(async {
        // 64 tasks each provision a block, then 64 tasks flush at once.
        let writes = (0..64).map(|b| {
            let (t, data) = (&t, &r.data);
            async move {
                let (res, _) = t.write(data, b * bs, IoBuf::filled(4096, 1), false).await;
                res.unwrap();
            }
        });
        rt::join_all(writes).await;
        let flushes = (0..64).map(|_| t.flush(&r.data));
        for res in rt::join_all(flushes).await {
            res.unwrap();
        }
    });
    let st = r.pool.status().stats;
    assert_eq!(st.flushes, 64);
    assert!(
        (1..=4).contains(&st.commits),
        "64 flushes took {} commits",
        st.commits
    );
    rt::block_on(async {
        // A FUA overwrite of a committed, unshared block needs no commit.
        let before = r.pool.status().stats.commits;
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 2), true).await;
        res.unwrap();
        assert_eq!(r.pool.status().stats.commits, before);
        // A FUA write that provisions does commit.
        let (res, _) = t
            .write(&r.data, 100 * bs, IoBuf::filled(4096, 2), true)
            .await;
        res.unwrap();
        assert_eq!(r.pool.status().stats.commits, before + 1);
    });
}

#[test]
fn zero_writes_allocate_nothing() {
    let r = rig(64 * KIB, 64, PoolConfig::default());
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    rt::block_on(async {
        let (res, _) = t.write(&r.data, 0, IoBuf::new(4096), false).await;
        res.unwrap();
        t.write_zeroes(&r.data, bs, 10 * bs + 4096).await.unwrap();
        assert_eq!(r.pool.status().thins[0].mapped_blocks, 0);
        // On provisioned blocks write-zeroes unmaps whole blocks and zeroes partial ones.
        let (res, _) = t
            .write(&r.data, 0, IoBuf::filled(2 * bs as usize, 5), false)
            .await;
        res.unwrap();
        t.write_zeroes(&r.data, 4096, 2 * bs - 4096).await.unwrap();
        let (res, buf) = t.read(&r.data, 0, IoBuf::new(2 * bs as usize)).await;
        res.unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 5));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        assert_eq!(r.pool.status().thins[0].mapped_blocks, 1);
    });
    assert!(r.pool.status().stats.zero_writes_elided >= 1);
}

#[test]
fn partial_first_writes_come_from_the_reserve_and_it_is_rezeroed_at_open() {
    let cfg = PoolConfig {
        reserve_blocks: 8,
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 64, cfg.clone());
    r.pool.wait_idle();
    assert_eq!(r.pool.status().reserve_ready, 8);
    r.pool.create_thin(1).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    let bs = t.block_size_bytes();
    rt::block_on(async {
        for b in 0..4 {
            let (res, _) = t
                .write(&r.data, b * bs + 4096, IoBuf::filled(4096, 1), false)
                .await;
            res.unwrap();
        }
        t.flush(&r.data).await.unwrap();
    });
    let st = r.pool.status().stats;
    assert_eq!(st.provisions_reserve, 4);
    assert_eq!(st.provisions_sync_zero, 0);
    drop(t);
    // Simulate a crash that left garbage in blocks the committed metadata still shows in the
    // reserve: scribble over every reserve block, then reopen.
    let Rig { pool, data, meta } = r;
    pool.close().unwrap();
    let mut reserved = Vec::new();
    {
        let md = thin_metadata::ThinMetadata::open(meta.clone()).unwrap();
        md.for_each_mapping(RESERVE_THIN, VBlock(0), |_, d, _| {
            reserved.push(d.0);
            true
        })
        .unwrap();
    }
    assert!(!reserved.is_empty());
    rt::block_on(async {
        use block_io::data::DataDevice;
        for &b in &reserved {
            let (res, _) = data
                .write(
                    block_io::data::DataBlock(b),
                    0,
                    IoBuf::filled(bs as usize, 0xEE),
                )
                .await;
            res.unwrap();
        }
    });
    let d = data.clone();
    let pool = Pool::open(meta.clone(), cfg, move || Ok(d.clone())).unwrap();
    pool.wait_idle();
    let t = pool.open_thin(1).unwrap();
    rt::block_on(async {
        for b in 10..20 {
            let (res, _) = t.write(&data, b * bs, IoBuf::filled(4096, 2), false).await;
            res.unwrap();
            let (res, buf) = t.read(&data, b * bs, IoBuf::new(bs as usize)).await;
            res.unwrap();
            assert!(buf[..4096].iter().all(|&x| x == 2));
            assert!(
                buf[4096..].iter().all(|&x| x == 0),
                "block {b}: the rest of a first-written block must be zero"
            );
        }
    });
    drop(t);
    pool.close().unwrap();
    assert_clean(&*meta);
}

#[test]
fn reserved_ids_and_bad_requests_get_clear_errors() {
    let r = rig(64 * KIB, 16, PoolConfig::default());
    assert_eq!(errno(r.pool.create_thin(thin_pool::FIRST_RESERVED_ID)), 22);
    assert_eq!(errno(r.pool.open_thin(3)), 19);
    r.pool.create_thin(3).unwrap();
    assert_eq!(errno(r.pool.create_thin(3)), 17);
    let t = r.pool.open_thin(3).unwrap();
    rt::block_on(async {
        let (res, _) = t.write(&r.data, 100, IoBuf::new(4096), false).await;
        assert_eq!(errno(res), 22, "unaligned");
        let (res, _) = t.read(&r.data, 0, IoBuf::new(1000)).await;
        assert_eq!(errno(res), 22, "odd length");
    });
}

#[test]
fn a_pool_too_low_on_metadata_for_its_reserve_still_opens() {
    // 64 metadata blocks leave nothing above the reserve kept for commits.
    let r = rig_on(
        Arc::new(MemMetaDevice::new(64)),
        64 * KIB,
        16,
        PoolConfig::default(),
    );
    r.pool.wait_idle();
    let st = r.pool.status();
    assert_eq!(st.reserve_ready, 0);
    assert_eq!(st.mode, PoolMode::Write);
    assert!(matches!(
        r.pool.create_thin(1),
        Err(PoolError::Metadata(_) | PoolError::NoMetadataSpace)
    ));
    close_and_check(r);
}

/// Records what a `ChangeLog` hears.
#[derive(Default)]
struct Recorder {
    changed: parking_lot::Mutex<Vec<(u32, u64)>>,
    durable: AtomicU64,
}

impl thin_pool::ChangeLog for Recorder {
    fn changed(&self, thin: u32, seq: u64) {
        self.changed.lock().push((thin, seq));
    }
    fn durable(&self, seq: u64) {
        self.durable.fetch_max(seq, Ordering::SeqCst);
    }
}

#[test]
fn the_change_log_hears_of_a_change_before_its_write_returns_and_of_the_commit() {
    let log = Arc::new(Recorder::default());
    let cfg = PoolConfig {
        reserve_blocks: 0,
        change_log: Some(log.clone()),
        ..PoolConfig::default()
    };
    let r = rig(64 * KIB, 16, cfg);
    r.pool.create_thin(1).unwrap();
    r.pool.create_thin(2).unwrap();
    let t = r.pool.open_thin(1).unwrap();
    rt::block_on(async {
        let before = log.changed.lock().len();
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 1), false).await;
        res.unwrap();
        let seen = log.changed.lock().clone();
        assert!(
            seen.len() > before,
            "the provision was logged before the write returned"
        );
        let (thin, seq) = *seen.last().unwrap();
        assert_eq!(thin, 1);
        assert!(log.durable.load(Ordering::SeqCst) < seq, "not durable yet");
        // An overwrite in place changes no mapping: nothing to log.
        let (res, _) = t.write(&r.data, 0, IoBuf::filled(4096, 2), false).await;
        res.unwrap();
        assert_eq!(log.changed.lock().len(), seen.len());
        t.flush(&r.data).await.unwrap();
        assert!(
            log.durable.load(Ordering::SeqCst) >= seq,
            "the flush made it durable"
        );
    });
    drop(t);
    close_and_check(r);
}

/// A partial write to a shared block is laid over the copy (one read, one write of the
/// block); a failed read of the old block fails the write and changes nothing, and blocks too
/// large for one buffer take the device's copy and a separate write.
#[test]
fn breaking_sharing_merges_the_write_into_the_copy_and_survives_a_failed_read() {
    use block_io::data::{DataFault, DataOp, FaultyDataDevice};
    for bs in [64 * KIB, 2048 * KIB] {
        let geo = DataGeometry::new(bs, 16, 4096).unwrap();
        let data = Arc::new(FaultyDataDevice::new(geo));
        let d = data.clone();
        let meta: Arc<dyn MetaDevice> = Arc::new(MemMetaDevice::new(1024));
        let cfg = PoolConfig {
            reserve_blocks: 0,
            ..PoolConfig::default()
        };
        let pool = Pool::format(meta, 16, cfg, move || Ok(d.clone())).unwrap();
        pool.create_thin(1).unwrap();
        let t = pool.open_thin(1).unwrap();
        rt::block_on(async {
            let (res, _) = t
                .write(&*data, 0, IoBuf::filled(bs as usize, 1), false)
                .await;
            res.unwrap();
            pool.create_snap(2, 1).await.unwrap();
            let (reads, copies) = (data.nr_ops(DataOp::Read), data.nr_ops(DataOp::Copy));
            data.add_fault(DataFault::Nth(DataOp::Read, 1));
            data.add_fault(DataFault::Nth(DataOp::Copy, 1));
            let (res, _) = t.write(&*data, 8192, IoBuf::filled(4096, 2), false).await;
            assert!(res.is_err(), "bs {bs}: the copy's failure fails the write");
            data.clear_faults();
            let (res, _) = t.write(&*data, 8192, IoBuf::filled(4096, 2), false).await;
            res.unwrap();
            let merged = bs <= 1024 * KIB;
            assert_eq!(
                data.nr_ops(DataOp::Copy) - copies,
                if merged { 0 } else { 2 },
                "bs {bs}"
            );
            assert_eq!(
                data.nr_ops(DataOp::Read) - reads,
                if merged { 2 } else { 0 },
                "bs {bs}"
            );
            assert_eq!(pool.status().stats.copies, 1, "bs {bs}");
            let (res, buf) = t.read(&*data, 0, IoBuf::new(bs as usize)).await;
            res.unwrap();
            let want = |i: usize| if (8192..12288).contains(&i) { 2 } else { 1 };
            assert!(
                buf.iter().enumerate().all(|(i, &b)| b == want(i)),
                "bs {bs}"
            );
            let snap = pool.open_thin(2).unwrap();
            let (res, buf) = snap.read(&*data, 0, IoBuf::new(bs as usize)).await;
            res.unwrap();
            assert!(
                buf.iter().all(|&b| b == 1),
                "bs {bs}: the snapshot keeps its data"
            );
        });
        drop(t);
        pool.close().unwrap();
    }
}
