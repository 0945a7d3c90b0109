//! The fault-injecting data device: EIO rules that change nothing, latency on the standalone
//! executor's timers, and crash images (flushed writes kept, a seeded subset of unflushed
//! writes kept, some torn at sector granularity).

mod data_common;

use block_io::data::rt::{block_on, join_all};
use block_io::data::{
    DataBlock, DataDevice, DataFault, DataGeometry, DataOp, FaultyDataDevice, IoBuf,
};
use block_io::{os_error, CrashConfig};
use std::time::{Duration, Instant};

const BS: u64 = 16 * 1024;

fn device() -> FaultyDataDevice {
    FaultyDataDevice::new(DataGeometry::new(BS, 8, 512).unwrap())
}

async fn write(dev: &FaultyDataDevice, block: u64, byte: u8) -> std::io::Result<()> {
    dev.write(DataBlock(block), 0, IoBuf::filled(BS as usize, byte))
        .await
        .0
}

async fn read(dev: &FaultyDataDevice, block: u64) -> std::io::Result<Vec<u8>> {
    let (res, buf) = dev.read(DataBlock(block), 0, IoBuf::new(BS as usize)).await;
    res.map(|()| buf.to_vec())
}

fn block_of(bytes: &[u8], block: u64) -> &[u8] {
    &bytes[(block * BS) as usize..((block + 1) * BS) as usize]
}

#[test]
fn injected_errors_are_eio_and_change_nothing() {
    let dev = device();
    block_on(async {
        write(&dev, 0, 1).await.unwrap();
        dev.add_fault(DataFault::Nth(DataOp::Write, 2));
        write(&dev, 1, 2).await.unwrap();
        let err = write(&dev, 0, 3).await.unwrap_err();
        assert_eq!(os_error(&err), Some(libc::EIO), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
        // Nth fires once, and the failed write did not land.
        assert!(read(&dev, 0).await.unwrap().iter().all(|&b| b == 1));
        write(&dev, 0, 4).await.unwrap();

        dev.add_fault(DataFault::OnBlock(DataOp::Read, 5));
        assert!(read(&dev, 5).await.is_err());
        assert!(read(&dev, 4).await.is_ok());
        // A copy fails if a rule names either of its blocks.
        dev.add_fault(DataFault::OnBlock(DataOp::Copy, 6));
        assert!(dev.copy_block(DataBlock(6), DataBlock(7)).await.is_err());
        assert!(dev.copy_block(DataBlock(1), DataBlock(6)).await.is_err());
        dev.copy_block(DataBlock(1), DataBlock(2)).await.unwrap();

        dev.add_fault(DataFault::Nth(DataOp::Flush, 1));
        let pending = dev.nr_pending_writes();
        assert!(dev.flush().await.is_err());
        assert_eq!(
            dev.nr_pending_writes(),
            pending,
            "a failed flush keeps the log"
        );
        dev.flush().await.unwrap();
        assert_eq!(dev.nr_pending_writes(), 0);

        dev.clear_faults();
        dev.add_fault(DataFault::AfterOps(2));
        assert!(read(&dev, 0).await.is_ok());
        assert!(dev.zero_blocks(DataBlock(3), 1).await.is_ok());
        assert!(dev.discard_blocks(DataBlock(3), 1).await.is_err());
        assert!(read(&dev, 0).await.is_err());
        dev.clear_faults();
        assert!(read(&dev, 0).await.is_ok());
    });
    // Every attempt counts, failed or not.
    assert_eq!(dev.nr_ops(DataOp::Write), 4);
    assert_eq!(dev.nr_ops(DataOp::Flush), 2);
}

#[test]
fn latency_runs_on_the_executor_timers_concurrently() {
    let dev = device();
    let latency = Duration::from_millis(40);
    dev.set_latency(DataOp::Read, latency);
    let start = Instant::now();
    block_on(read(&dev, 0)).unwrap();
    let one = start.elapsed();
    assert!(one >= latency, "{one:?}");

    let start = Instant::now();
    let results = block_on(join_all((0..8).map(|b| read(&dev, b))));
    let eight = start.elapsed();
    assert!(results.iter().all(Result::is_ok));
    // Eight delayed reads overlap: far less than eight delays (generous for a busy host).
    assert!(eight >= latency && eight < latency * 4, "{eight:?}");
    // Writes were not delayed.
    let start = Instant::now();
    block_on(write(&dev, 0, 1)).unwrap();
    assert!(start.elapsed() < latency, "{:?}", start.elapsed());
}

#[test]
fn crash_images_keep_flushed_and_some_unflushed_writes() {
    let dev = device();
    block_on(async {
        write(&dev, 0, 0xaa).await.unwrap();
        dev.flush().await.unwrap();
        write(&dev, 1, 0xbb).await.unwrap();
        dev.copy_block(DataBlock(0), DataBlock(2)).await.unwrap();
        dev.zero_blocks(DataBlock(0), 1).await.unwrap();
    });
    let durable = dev.durable_image().to_bytes();
    assert!(block_of(&durable, 0).iter().all(|&b| b == 0xaa));
    assert!(block_of(&durable, 1).iter().all(|&b| b == 0));

    let all = dev
        .crash_image_with(
            1,
            CrashConfig {
                keep_probability: 1.0,
                tear_probability: 0.0,
            },
        )
        .to_bytes();
    assert!(block_of(&all, 0).iter().all(|&b| b == 0));
    assert!(block_of(&all, 1).iter().all(|&b| b == 0xbb));
    assert!(block_of(&all, 2).iter().all(|&b| b == 0xaa));

    let none = dev
        .crash_image_with(
            1,
            CrashConfig {
                keep_probability: 0.0,
                tear_probability: 0.0,
            },
        )
        .to_bytes();
    assert_eq!(none, durable);

    let torn = dev
        .crash_image_with(
            7,
            CrashConfig {
                keep_probability: 1.0,
                tear_probability: 1.0,
            },
        )
        .to_bytes();
    // Every write is torn: some but not all of block 1's sectors landed.
    let sectors: Vec<bool> = block_of(&torn, 1)
        .chunks(512)
        .map(|s| s.iter().all(|&b| b == 0xbb))
        .collect();
    assert!(
        sectors.iter().any(|&s| s) && !sectors.iter().all(|&s| s),
        "{sectors:?}"
    );

    // Seeded: the same seed gives the same image.
    assert_eq!(
        dev.crash_image(42).to_bytes(),
        dev.crash_image(42).to_bytes()
    );
}

#[test]
fn crash_image_reopens_as_a_faulty_device() {
    let dev = device();
    block_on(write(&dev, 3, 0x33)).unwrap();
    block_on(dev.flush()).unwrap();
    let image = dev.crash_image(5);
    let reopened = FaultyDataDevice::from_image(&image);
    let got = block_on(read(&reopened, 3)).unwrap();
    assert!(got.iter().all(|&b| b == 0x33));
}
