//! A data device in memory: for models, tests and crash images.
//!
//! It enforces the same geometry and alignment checks as the file engines, so code tested
//! against it makes no request a real device would refuse. Every operation completes at once;
//! every write is durable at once (`flush` is a no-op); discards read back as zeros.

use super::{
    check_copy, BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, IoBuf, Primitive,
};
use parking_lot::Mutex;
use std::io;

/// A fixed-size in-memory data device.
#[derive(Debug)]
pub struct MemDataDevice {
    geometry: DataGeometry,
    bytes: Mutex<Vec<u8>>,
}

impl MemDataDevice {
    /// A zero-filled device.
    pub fn new(geometry: DataGeometry) -> Self {
        let len = usize::try_from(geometry.len_bytes()).unwrap_or(usize::MAX);
        Self {
            geometry,
            bytes: Mutex::new(vec![0; len]),
        }
    }

    /// A device holding `bytes`, which must be exactly `geometry.len_bytes()` long.
    pub fn from_bytes(geometry: DataGeometry, bytes: Vec<u8>) -> io::Result<Self> {
        if bytes.len() as u64 != geometry.len_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes given for a data device of {} bytes",
                    bytes.len(),
                    geometry.len_bytes()
                ),
            ));
        }
        Ok(Self {
            geometry,
            bytes: Mutex::new(bytes),
        })
    }

    /// A copy of the whole image.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }

    fn range(pos: u64, len: usize) -> std::ops::Range<usize> {
        // Checked against the geometry, whose byte size fits the image (a usize).
        let start = pos as usize;
        start..start + len
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) {
        self.bytes.lock()[Self::range(offset, len as usize)].fill(byte);
    }
}

impl DataDevice for MemDataDevice {
    fn geometry(&self) -> DataGeometry {
        self.geometry
    }

    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        let mut buf = buf;
        match self
            .geometry
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(pos) => {
                let range = Self::range(pos, buf.len());
                buf.copy_from_slice(&self.bytes.lock()[range]);
                (Ok(()), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        match self
            .geometry
            .check_io(block, offset_bytes, buf.len() as u64)
        {
            Ok(pos) => {
                self.bytes.lock()[Self::range(pos, buf.len())].copy_from_slice(&buf);
                (Ok(()), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        let mut bufs = bufs;
        match self.geometry.check_iovecs(block, offset_bytes, &bufs) {
            Ok(mut pos) => {
                let bytes = self.bytes.lock();
                for buf in &mut bufs {
                    let len = buf.len();
                    buf.copy_from_slice(&bytes[Self::range(pos, len)]);
                    pos += len as u64;
                }
                drop(bytes);
                (Ok(()), bufs)
            }
            Err(e) => (Err(e), bufs),
        }
    }

    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        match self.geometry.check_iovecs(block, offset_bytes, &bufs) {
            Ok(mut pos) => {
                let mut bytes = self.bytes.lock();
                for buf in &bufs {
                    bytes[Self::range(pos, buf.len())].copy_from_slice(buf);
                    pos += buf.len() as u64;
                }
                drop(bytes);
                (Ok(()), bufs)
            }
            Err(e) => (Err(e), bufs),
        }
    }

    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry.check_blocks(first, nr_blocks)?;
        self.fill(offset, len, 0);
        Ok(Primitive::Memory)
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        check_copy(&self.geometry, from, to)?;
        let bs = self.geometry.block_size_bytes;
        let len = bs as usize;
        let src = Self::range(from.0 * bs, len);
        self.bytes.lock().copy_within(src, (to.0 * bs) as usize);
        Ok(())
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        let (offset, len) = self.geometry.check_blocks(first, nr_blocks)?;
        self.fill(offset, len, 0);
        Ok(Primitive::Memory)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
