//! What a client was told is durable survives a crash: the pool runs on fault-injecting
//! devices in memory, a client writes (some with FUA, some before a flush, some after it),
//! then vanishes mid-request; crash images of both devices taken afterwards (only flushed
//! writes kept for certain, a seeded random subset of the rest, some torn) are reopened as
//! pools, and every FUA write and every write acknowledged before an acknowledged flush must
//! read back.

mod common;

use block_io::data::{rt, DataGeometry, FaultyDataDevice, IoBuf, MemDataDevice};
use block_io::{FaultyMetaDevice, MemMetaDevice};
use common::*;
use nbd_server::{Export, ExportConfig, Listen};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thin_pool::{Pool, PoolConfig};

const NR_BLOCKS: u64 = 128;
const SIZE: u64 = 32 << 20;
const NR_SEEDS: u64 = 24;

fn config() -> PoolConfig {
    // No periodic commit and no background zeroing: what is durable is what the client's
    // FUA writes and flushes made durable, nothing more.
    PoolConfig {
        reserve_blocks: 0,
        commit_interval: Duration::from_secs(3600),
        ..PoolConfig::default()
    }
}

#[test]
fn acknowledged_fua_writes_and_flushes_survive_a_crash() {
    let dir = TempDir::new("durability");
    let meta = Arc::new(FaultyMetaDevice::new(1024));
    let geo = DataGeometry::new(BLOCK_BYTES, NR_BLOCKS, 4096).unwrap();
    let data = Arc::new(FaultyDataDevice::new(geo));
    let d = data.clone();
    let pool = Pool::format(meta.clone(), NR_BLOCKS, config(), move || Ok(d.clone())).unwrap();
    pool.create_thin(1).unwrap();
    let pool = Arc::new(pool);
    let d = data.clone();
    let mut cfg = ExportConfig::new(
        pool.clone(),
        1,
        SIZE,
        Listen::Unix(dir.path("s")),
        move || Ok(d.clone()),
    );
    cfg.name = "vol".into();
    let export = Export::start(cfg).unwrap();
    let sock = socket_of(&export);

    let (mut c, info) = Client::open(&sock, "vol");
    // A second connection: the export offers multi-conn, so its flush must cover the
    // first connection's writes too.
    let (mut c2, _) = Client::open(&sock, "vol");
    assert_eq!(info.flags & 256, 256, "NBD_FLAG_CAN_MULTI_CONN");
    let bs = BLOCK_BYTES;
    // Blocks 0..8: FUA writes, each into a fresh block (a commit per write).
    for i in 0..8 {
        assert_eq!(c.write(FUA, i * bs, &pattern(i, 8192)), 0);
    }
    // Overwrites of committed blocks with FUA: a data flush, no commit needed.
    assert_eq!(c.write(FUA, 2 * bs, &pattern(102, 4096)), 0);
    // Blocks 8..16: plain writes, then a flush on the other connection (the last thing that
    // makes anything durable).
    for i in 8..16 {
        c.write_req(0, i, i * bs + 4096, &pattern(i, 4096));
    }
    for _ in 8..16 {
        assert_eq!(c.reply().0, 0);
    }
    assert_eq!(c2.call(FLUSH, 0, 0, 0), 0);
    drop(c2);
    // Blocks 16..24: plain writes never flushed (may be lost), then a half-sent write and
    // the client is gone.
    for i in 16..24 {
        assert_eq!(c.write(0, i * bs, &pattern(i, 4096)), 0);
    }
    let mut half = request_bytes(WRITE, FUA, 1, 30 * bs, 8192).to_vec();
    half.extend_from_slice(&[0xee; 4096]);
    c.s.write_all(&half).unwrap();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while export.stats().nr_connections > 0 {
        assert!(Instant::now() < deadline, "the connection did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    export.stop();

    let mut want: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..8 {
        want.push((i * bs, pattern(i, 8192)));
    }
    want[2] = (
        2 * bs,
        [pattern(102, 4096), pattern(2, 8192)[4096..].to_vec()].concat(),
    );
    for i in 8..16 {
        want.push((i * bs + 4096, pattern(i, 4096)));
    }
    for seed in 0..NR_SEEDS {
        let meta_img: Arc<MemMetaDevice> = Arc::new(meta.crash_image(seed));
        let data_img = Arc::new(data.crash_image(seed));
        let d = data_img.clone();
        let crashed = Pool::open(meta_img, config(), move || {
            Ok::<Arc<MemDataDevice>, _>(d.clone())
        })
        .unwrap_or_else(|e| panic!("seed {seed}: the crash image does not open: {e}"));
        let thin = crashed.open_thin(1).unwrap();
        rt::block_on(async {
            for (off, bytes) in &want {
                let (res, buf) = thin.read(&data_img, *off, IoBuf::new(bytes.len())).await;
                res.unwrap();
                assert!(
                    buf[..] == bytes[..],
                    "seed {seed}: acknowledged data at byte {off} was lost in the crash"
                );
            }
            // The half-sent write never happened.
            let (res, buf) = thin.read(&data_img, 30 * bs, IoBuf::new(8192)).await;
            res.unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "seed {seed}: a half-sent write landed"
            );
        });
    }
    drop(pool);
}
