//! Space-map blocks: bitmap blocks of 2-bit reference counts, index entries, the metadata
//! space map's single index block, and the space-map root kept in the superblock.
//!
//! A 2-bit count of 0, 1 or 2 is the reference count; 3 means "look in the reference-count
//! btree", which holds the exact count of every such block.

use super::{get_u32, get_u64, put_u32, put_u64, seal, verify, zeroed_block, MetaBlock};
use super::{BITMAP_CSUM_XOR, INDEX_CSUM_XOR, META_BLOCK_SIZE};
use crate::error::Result;

/// Bytes of a bitmap block header: checksum, unused word, block number.
pub const BITMAP_HEADER_SIZE: usize = 16;
/// Bytes of 2-bit counts in a bitmap block.
pub const BITMAP_BYTES: usize = META_BLOCK_SIZE - BITMAP_HEADER_SIZE;
/// Blocks described by one bitmap block.
pub const ENTRIES_PER_BITMAP: u64 = (BITMAP_BYTES * 4) as u64;
const _: () = assert!(ENTRIES_PER_BITMAP == 16320);

/// Size of an index entry.
pub const INDEX_ENTRY_SIZE: usize = 16;
/// Index entries in the metadata space map's index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
const INDEX_HEADER_SIZE: usize = 16;
const _: () =
    assert!(INDEX_HEADER_SIZE + MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE <= META_BLOCK_SIZE);
/// The most metadata blocks a pool can use (about 15.9 GiB).
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;

/// Size of the space-map root field in the superblock.
pub const SM_ROOT_SIZE: usize = 128;

/// The 2-bit count of entry `i` in a bitmap's count bytes.
pub fn bitmap_get(bits: &[u8], i: u64) -> u32 {
    let byte = bits.get((i / 4) as usize).copied().unwrap_or(0);
    let shift = 2 * (i % 4) as u32;
    let hi = (byte >> shift) & 1;
    let lo = (byte >> (shift + 1)) & 1;
    u32::from((hi << 1) | lo)
}

/// Sets the 2-bit count of entry `i` (`v <= 3`).
pub fn bitmap_set(bits: &mut [u8], i: u64, v: u32) {
    debug_assert!(v <= 3);
    let shift = 2 * (i % 4) as u32;
    if let Some(byte) = bits.get_mut((i / 4) as usize) {
        let hi = ((v >> 1) & 1) as u8;
        let lo = (v & 1) as u8;
        *byte = (*byte & !(3 << shift)) | (hi << shift) | (lo << (shift + 1));
    }
}

/// Encodes a bitmap block for `location` from its count bytes.
pub fn encode_bitmap(bits: &[u8; BITMAP_BYTES], location: u64) -> Box<MetaBlock> {
    let mut b = zeroed_block();
    put_u64(&mut b[..], 8, location);
    b[BITMAP_HEADER_SIZE..].copy_from_slice(bits);
    seal(&mut b, BITMAP_CSUM_XOR);
    b
}

/// Validates a bitmap block read from `location` and returns its count bytes.
pub fn decode_bitmap(b: &MetaBlock, location: u64) -> Result<Box<[u8; BITMAP_BYTES]>> {
    verify(b, location, BITMAP_CSUM_XOR, "space map bitmap")?;
    let mut bits = Box::new([0u8; BITMAP_BYTES]);
    bits.copy_from_slice(&b[BITMAP_HEADER_SIZE..]);
    Ok(bits)
}

/// Where a bitmap block lives and a summary of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// Location of the bitmap block.
    pub blocknr: u64,
    /// Entries of the bitmap whose count is zero.
    pub nr_free: u32,
    /// No entry before this one is free (a search hint).
    pub none_free_before: u32,
}

impl IndexEntry {
    /// Encodes into 16 bytes.
    pub fn encode(&self) -> [u8; INDEX_ENTRY_SIZE] {
        let mut b = [0u8; INDEX_ENTRY_SIZE];
        put_u64(&mut b, 0, self.blocknr);
        put_u32(&mut b, 8, self.nr_free);
        put_u32(&mut b, 12, self.none_free_before);
        b
    }

    /// Decodes from 16 bytes (shorter input reads as zeros).
    pub fn decode(b: &[u8]) -> Self {
        IndexEntry {
            blocknr: get_u64(b, 0),
            nr_free: get_u32(b, 8),
            none_free_before: get_u32(b, 12),
        }
    }
}

/// Encodes the metadata space map's index block for `location`.
pub fn encode_metadata_index(entries: &[IndexEntry], location: u64) -> Box<MetaBlock> {
    assert!(
        entries.len() <= MAX_METADATA_BITMAPS,
        "too many metadata bitmaps"
    );
    let mut b = zeroed_block();
    put_u64(&mut b[..], 8, location);
    for (i, e) in entries.iter().enumerate() {
        let at = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
        b[at..at + INDEX_ENTRY_SIZE].copy_from_slice(&e.encode());
    }
    seal(&mut b, INDEX_CSUM_XOR);
    b
}

/// Validates the metadata index block read from `location`; returns its first `nr` entries.
pub fn decode_metadata_index(b: &MetaBlock, location: u64, nr: usize) -> Result<Vec<IndexEntry>> {
    verify(b, location, INDEX_CSUM_XOR, "metadata space map index")?;
    let nr = nr.min(MAX_METADATA_BITMAPS);
    Ok((0..nr)
        .map(|i| {
            let at = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
            IndexEntry::decode(&b[at..at + INDEX_ENTRY_SIZE])
        })
        .collect())
}

/// The root of a space map, embedded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Data space map: root of the index btree. Metadata space map: the index block.
    pub bitmap_root: u64,
    /// Root of the reference-count btree (counts above 2).
    pub ref_count_root: u64,
}

impl SmRoot {
    /// Encodes into the first 32 bytes of `b` (the rest of the 128-byte field stays zero).
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.nr_blocks);
        put_u64(b, 8, self.nr_allocated);
        put_u64(b, 16, self.bitmap_root);
        put_u64(b, 24, self.ref_count_root);
    }

    /// Decodes from the 128-byte field.
    pub fn decode(b: &[u8]) -> Self {
        SmRoot {
            nr_blocks: get_u64(b, 0),
            nr_allocated: get_u64(b, 8),
            bitmap_root: get_u64(b, 16),
            ref_count_root: get_u64(b, 24),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_follow_the_kernel_layout() {
        // Entry 0 keeps its high bit in bit 0 of byte 0 and its low bit in bit 1.
        let mut bits = [0u8; BITMAP_BYTES];
        bitmap_set(&mut bits, 0, 2);
        assert_eq!(bits[0], 0b01);
        bitmap_set(&mut bits, 0, 1);
        assert_eq!(bits[0], 0b10);
        bitmap_set(&mut bits, 5, 3);
        assert_eq!(bits[1], 0b1100);
        for i in 0..64 {
            bitmap_set(&mut bits, i, (i % 4) as u32);
        }
        for i in 0..64 {
            assert_eq!(bitmap_get(&bits, i), (i % 4) as u32);
        }
    }

    #[test]
    fn index_and_bitmap_round_trip() {
        let mut bits = Box::new([0u8; BITMAP_BYTES]);
        bitmap_set(&mut bits[..], 77, 3);
        let b = encode_bitmap(&bits, 9);
        assert_eq!(decode_bitmap(&b, 9).expect("decodes")[..], bits[..]);
        let e = vec![
            IndexEntry {
                blocknr: 5,
                nr_free: 3,
                none_free_before: 1
            };
            4
        ];
        let b = encode_metadata_index(&e, 2);
        assert_eq!(decode_metadata_index(&b, 2, 4).expect("decodes"), e);
        assert!(decode_metadata_index(&b, 3, 4).is_err());
    }
}
