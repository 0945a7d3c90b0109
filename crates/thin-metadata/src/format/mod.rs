//! The dm-thin v2 on-disk format, bit for bit (see docs/format.md).
//!
//! Every block type has its own checksum salt and stores its own block number; both are
//! checked after every read and set before every write. Decoders never panic on any input:
//! every offset is checked, and every problem is an `Error::Corrupt` naming the block.
//! All integers on disk are little-endian.

pub(crate) mod details;
mod node;
mod sm;
pub(crate) mod superblock;

pub use details::{pack_block_time, unpack_block_time, DeviceDetails, DETAILS_SIZE};
pub use node::{max_entries, Node, NodeKind, NODE_HEADER_SIZE};
pub use sm::{
    bitmap_get, bitmap_set, decode_bitmap, decode_metadata_index, encode_bitmap,
    encode_metadata_index, IndexEntry, SmRoot, BITMAP_BYTES, ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE,
    MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS, SM_ROOT_SIZE,
};
pub use superblock::{Superblock, SUPERBLOCK_LOCATION, SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION};

use crate::error::{Error, Result};
pub use block_io::{MetaBlock, META_BLOCK_SIZE};

/// Checksum salt of the superblock.
pub const SUPERBLOCK_CSUM_XOR: u32 = 160774;
/// Checksum salt of btree nodes.
pub const BTREE_CSUM_XOR: u32 = 121107;
/// Checksum salt of the metadata space map's index block.
pub const INDEX_CSUM_XOR: u32 = 160478;
/// Checksum salt of space-map bitmap blocks.
pub const BITMAP_CSUM_XOR: u32 = 240779;

/// The checksum of a block as the kernel's `dm_bm_checksum` computes it: crc32c seeded with
/// all ones over everything after the 4-byte checksum field, without the final inversion,
/// xored with the block type's salt.
pub fn block_checksum(block: &MetaBlock, salt: u32) -> u32 {
    let body = block.get(4..).unwrap_or(&[]);
    crc32c::crc32c(body) ^ 0xffff_ffff ^ salt
}

/// Stores the checksum of `block` in its first four bytes.
pub fn seal(block: &mut MetaBlock, salt: u32) {
    let csum = block_checksum(block, salt);
    put_u32(block, 0, csum);
}

/// Checks the stored checksum and self block number (at offset 8) of a block read from
/// `location`. `what` names the block type in the error.
pub fn verify(block: &MetaBlock, location: u64, salt: u32, what: &str) -> Result<()> {
    let stored = get_u32(block, 0);
    let computed = block_checksum(block, salt);
    if stored != computed {
        return Err(Error::corrupt(
            location,
            format!("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    let blocknr = get_u64(block, 8);
    if blocknr != location {
        return Err(Error::corrupt(
            location,
            format!("{what} says it lives at block {blocknr} (misdirected write?)"),
        ));
    }
    Ok(())
}

// Fixed-offset little-endian accessors. Out-of-range offsets read as zero and writes to them
// are dropped: every caller passes offsets that are checked against the block size first
// (constant layouts, or entry counts validated against max_entries), so this is only a
// guard against panics, never a way data is lost.

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// A zeroed block on the heap.
pub fn zeroed_block() -> Box<MetaBlock> {
    Box::new([0u8; META_BLOCK_SIZE])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_kernel_definition() {
        // The kernel computes crc32c(~0, data) without final inversion; the standard crc32c
        // inverts at the end. So kernel == !standard. An all-zero body has a well-known value.
        let mut b = [0u8; META_BLOCK_SIZE];
        let std = crc32c::crc32c(&b[4..]);
        assert_eq!(block_checksum(&b, 0), !std);
        seal(&mut b, SUPERBLOCK_CSUM_XOR);
        assert_eq!(get_u32(&b, 0), !std ^ SUPERBLOCK_CSUM_XOR);
    }

    #[test]
    fn verify_detects_flips_and_misdirection() {
        let mut b = [0u8; META_BLOCK_SIZE];
        put_u64(&mut b, 8, 7);
        seal(&mut b, BTREE_CSUM_XOR);
        verify(&b, 7, BTREE_CSUM_XOR, "node").expect("valid");
        assert!(verify(&b, 8, BTREE_CSUM_XOR, "node").is_err());
        assert!(verify(&b, 7, BITMAP_CSUM_XOR, "node").is_err());
        b[100] ^= 1;
        assert!(verify(&b, 7, BTREE_CSUM_XOR, "node").is_err());
    }
}
