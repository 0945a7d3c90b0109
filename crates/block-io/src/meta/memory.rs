//! A metadata device in memory: for tests, models and benchmarks.

use super::{out_of_range, MetaBlock, MetaDevice, META_BLOCK_SIZE};
use parking_lot::RwLock;
use std::io;

/// A growable in-memory device. Every write is durable at once; `flush` is a no-op.
#[derive(Debug)]
pub struct MemMetaDevice {
    blocks: RwLock<Vec<Box<MetaBlock>>>,
}

impl MemMetaDevice {
    /// A zero-filled device of `nr_blocks` blocks.
    pub fn new(nr_blocks: u64) -> Self {
        let blocks = (0..nr_blocks)
            .map(|_| Box::new([0u8; META_BLOCK_SIZE]))
            .collect();
        Self {
            blocks: RwLock::new(blocks),
        }
    }

    /// Grows (never shrinks) the device to `nr_blocks`, with zero-filled new blocks.
    pub fn grow(&self, nr_blocks: u64) {
        let mut blocks = self.blocks.write();
        while (blocks.len() as u64) < nr_blocks {
            blocks.push(Box::new([0u8; META_BLOCK_SIZE]));
        }
    }

    /// A copy of the whole image, as one byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.blocks.read().iter().fold(Vec::new(), |mut v, b| {
            // Whole-block copies: a byte-at-a-time iterator is slow in debug builds.
            v.extend_from_slice(&b[..]);
            v
        })
    }

    /// A device holding these blocks.
    pub fn from_blocks(blocks: Vec<Box<MetaBlock>>) -> Self {
        Self {
            blocks: RwLock::new(blocks),
        }
    }

    /// A device holding `bytes` (its length rounded down to whole blocks).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let blocks = bytes
            .chunks_exact(META_BLOCK_SIZE)
            .map(|c| {
                let mut b = Box::new([0u8; META_BLOCK_SIZE]);
                b.copy_from_slice(c);
                b
            })
            .collect();
        Self {
            blocks: RwLock::new(blocks),
        }
    }

    /// Overwrites bytes at `offset` of block `block` (tests use this to inject damage).
    pub fn patch(&self, block: u64, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let mut blocks = self.blocks.write();
        let nr = blocks.len() as u64;
        let b = usize::try_from(block)
            .ok()
            .and_then(|i| blocks.get_mut(i))
            .ok_or_else(|| out_of_range(block, nr))?;
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= META_BLOCK_SIZE);
        let end = end.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "patch runs past the end of the block",
            )
        })?;
        b[offset..end].copy_from_slice(bytes);
        Ok(())
    }
}

impl MetaDevice for MemMetaDevice {
    fn nr_blocks(&self) -> u64 {
        self.blocks.read().len() as u64
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        let blocks = self.blocks.read();
        let nr = blocks.len() as u64;
        let b = usize::try_from(block).ok().and_then(|i| blocks.get(i));
        buf.copy_from_slice(&b.ok_or_else(|| out_of_range(block, nr))?[..]);
        Ok(())
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        let mut blocks = self.blocks.write();
        let nr = blocks.len() as u64;
        let b = usize::try_from(block).ok().and_then(|i| blocks.get_mut(i));
        b.ok_or_else(|| out_of_range(block, nr))?
            .copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
