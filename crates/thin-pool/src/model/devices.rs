//! The devices under the model's pool: a memory data device that yields (and may sleep)
//! before each operation so that concurrent requests interleave, and a memory metadata
//! device with room to grow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use block_io::data::{
    rt, BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, IoBuf, MemDataDevice, Primitive,
};
use block_io::{MemMetaDevice, MetaBlock, MetaDevice};

/// The data device requests go through: memory, with deterministic yields (and optional
/// short sleeps) before each operation so that concurrent requests interleave.
#[derive(Debug)]
pub(super) struct JitterDevice {
    pub(super) inner: MemDataDevice,
    pub(super) ctr: AtomicU64,
    pub(super) seed: u64,
    pub(super) sleeps: bool,
}

impl JitterDevice {
    async fn jitter(&self) {
        let n = self.ctr.fetch_add(1, Ordering::Relaxed);
        let h = mix(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for _ in 0..h % 3 {
            rt::yield_now().await;
        }
        if self.sleeps && (h >> 8).is_multiple_of(8) {
            rt::sleep(Duration::from_micros(20 + (h >> 16) % 80)).await;
        }
    }
}

pub(super) fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl DataDevice for JitterDevice {
    fn geometry(&self) -> DataGeometry {
        self.inner.geometry()
    }

    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        self.jitter().await;
        self.inner.read(block, offset_bytes, buf).await
    }

    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        self.jitter().await;
        self.inner.write(block, offset_bytes, buf).await
    }

    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        self.jitter().await;
        self.inner.read_vectored(block, offset_bytes, bufs).await
    }

    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        self.jitter().await;
        self.inner.write_vectored(block, offset_bytes, bufs).await
    }

    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> std::io::Result<Primitive> {
        self.jitter().await;
        self.inner.zero_blocks(first, nr_blocks).await
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> std::io::Result<()> {
        self.jitter().await;
        self.inner.copy_block(from, to).await
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> std::io::Result<Primitive> {
        self.jitter().await;
        self.inner.discard_blocks(first, nr_blocks).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.jitter().await;
        self.inner.flush().await
    }
}

/// The metadata device: memory with room to grow. The pool sees `visible` blocks; growing
/// the metadata when it runs low (as an operator would) raises it.
#[derive(Debug)]
pub(super) struct GrowableMeta {
    pub(super) inner: MemMetaDevice,
    pub(super) visible: AtomicU64,
}

impl GrowableMeta {
    fn check(&self, block: u64) -> std::io::Result<()> {
        let n = self.nr_blocks();
        if block >= n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("metadata block {block} is past the end of the device ({n} blocks)"),
            ));
        }
        Ok(())
    }
}

impl MetaDevice for GrowableMeta {
    fn nr_blocks(&self) -> u64 {
        self.visible.load(Ordering::SeqCst)
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> std::io::Result<()> {
        self.check(block)?;
        self.inner.read_block(block, buf)
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> std::io::Result<()> {
        self.check(block)?;
        self.inner.write_block(block, buf)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
