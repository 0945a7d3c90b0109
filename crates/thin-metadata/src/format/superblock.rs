//! The superblock: block 0, the root of everything.
//!
//! Layout (offsets derived from the field sizes, see docs/format.md): it must fit in one
//! 512-byte sector so that its write is atomic; the rest of the 4 KiB block is zero, and the
//! checksum covers the whole block after the checksum field.

use super::{get_u32, get_u64, put_u32, put_u64, seal, verify, zeroed_block, MetaBlock, SmRoot};
use super::{SM_ROOT_SIZE, SUPERBLOCK_CSUM_XOR};
use crate::error::{Error, Result};

/// Where the superblock lives.
pub const SUPERBLOCK_LOCATION: u64 = 0;
/// dm-thin's magic number.
pub const SUPERBLOCK_MAGIC: u64 = 27022010;
/// The metadata format version we write and read.
pub const SUPERBLOCK_VERSION: u32 = 2;
/// Superblock flag: the metadata must be checked before it is used read-write.
pub const NEEDS_CHECK_FLAG: u32 = 1;
/// Metadata block size in 512-byte sectors.
pub const METADATA_BLOCK_SIZE_SECTORS: u32 = 8;

const CSUM: usize = 0;
const FLAGS: usize = CSUM + 4;
const BLOCKNR: usize = FLAGS + 4;
const UUID: usize = BLOCKNR + 8;
const MAGIC: usize = UUID + 16;
const VERSION: usize = MAGIC + 8;
const TIME: usize = VERSION + 4;
const TRANS_ID: usize = TIME + 4;
const HELD_ROOT: usize = TRANS_ID + 8;
const DATA_SM_ROOT: usize = HELD_ROOT + 8;
const META_SM_ROOT: usize = DATA_SM_ROOT + SM_ROOT_SIZE;
const DATA_MAPPING_ROOT: usize = META_SM_ROOT + SM_ROOT_SIZE;
const DEVICE_DETAILS_ROOT: usize = DATA_MAPPING_ROOT + 8;
const DATA_BLOCK_SIZE: usize = DEVICE_DETAILS_ROOT + 8;
const METADATA_BLOCK_SIZE: usize = DATA_BLOCK_SIZE + 4;
const METADATA_NR_BLOCKS: usize = METADATA_BLOCK_SIZE + 4;
const COMPAT_FLAGS: usize = METADATA_NR_BLOCKS + 8;
const COMPAT_RO_FLAGS: usize = COMPAT_FLAGS + 4;
const INCOMPAT_FLAGS: usize = COMPAT_RO_FLAGS + 4;
/// Size of the encoded superblock.
pub const SUPERBLOCK_SIZE: usize = INCOMPAT_FLAGS + 4;

const _: () = assert!(SUPERBLOCK_SIZE == 364);
const _: () = assert!(
    SUPERBLOCK_SIZE <= 512,
    "the superblock must fit in one atomic sector"
);

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    /// Format version, 1 or 2. Kept as read, as the kernel does (it never rewrites it);
    /// new metadata gets `SUPERBLOCK_VERSION`.
    pub version: u32,
    pub time: u32,
    pub trans_id: u64,
    /// Location of the held metadata snapshot's superblock copy, 0 if none.
    pub held_root: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub data_mapping_root: u64,
    pub device_details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    pub metadata_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    /// True when the needs_check flag is set.
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK_FLAG != 0
    }

    /// Encodes the superblock for block `location` (0, or a held-root copy), sealed.
    pub fn encode(&self, location: u64) -> Box<MetaBlock> {
        let mut b = zeroed_block();
        put_u32(&mut b[..], FLAGS, self.flags);
        put_u64(&mut b[..], BLOCKNR, location);
        b[UUID..UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut b[..], MAGIC, SUPERBLOCK_MAGIC);
        put_u32(&mut b[..], VERSION, self.version);
        put_u32(&mut b[..], TIME, self.time);
        put_u64(&mut b[..], TRANS_ID, self.trans_id);
        put_u64(&mut b[..], HELD_ROOT, self.held_root);
        self.data_sm_root
            .encode(&mut b[DATA_SM_ROOT..DATA_SM_ROOT + SM_ROOT_SIZE]);
        self.metadata_sm_root
            .encode(&mut b[META_SM_ROOT..META_SM_ROOT + SM_ROOT_SIZE]);
        put_u64(&mut b[..], DATA_MAPPING_ROOT, self.data_mapping_root);
        put_u64(&mut b[..], DEVICE_DETAILS_ROOT, self.device_details_root);
        put_u32(&mut b[..], DATA_BLOCK_SIZE, self.data_block_size);
        put_u32(&mut b[..], METADATA_BLOCK_SIZE, self.metadata_block_size);
        put_u64(&mut b[..], METADATA_NR_BLOCKS, self.metadata_nr_blocks);
        put_u32(&mut b[..], COMPAT_FLAGS, self.compat_flags);
        put_u32(&mut b[..], COMPAT_RO_FLAGS, self.compat_ro_flags);
        put_u32(&mut b[..], INCOMPAT_FLAGS, self.incompat_flags);
        seal(&mut b, SUPERBLOCK_CSUM_XOR);
        b
    }

    /// True when the block is all zeros: an unformatted metadata device.
    pub fn is_blank(block: &MetaBlock) -> bool {
        block.iter().all(|&x| x == 0)
    }

    /// Decodes and validates a superblock read from `location`.
    pub fn decode(block: &MetaBlock, location: u64) -> Result<Self> {
        let magic = get_u64(block, MAGIC);
        if magic != SUPERBLOCK_MAGIC {
            return Err(Error::NotFormatted(format!(
                "superblock at block {location} has magic {magic}, expected {SUPERBLOCK_MAGIC}"
            )));
        }
        verify(block, location, SUPERBLOCK_CSUM_XOR, "superblock")?;
        let version = get_u32(block, VERSION);
        if !(1..=SUPERBLOCK_VERSION).contains(&version) {
            return Err(Error::NotFormatted(format!(
                "superblock version {version} is not supported (expected 1 or 2)"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&block[UUID..UUID + 16]);
        let sb = Superblock {
            flags: get_u32(block, FLAGS),
            uuid,
            version,
            time: get_u32(block, TIME),
            trans_id: get_u64(block, TRANS_ID),
            held_root: get_u64(block, HELD_ROOT),
            data_sm_root: SmRoot::decode(&block[DATA_SM_ROOT..DATA_SM_ROOT + SM_ROOT_SIZE]),
            metadata_sm_root: SmRoot::decode(&block[META_SM_ROOT..META_SM_ROOT + SM_ROOT_SIZE]),
            data_mapping_root: get_u64(block, DATA_MAPPING_ROOT),
            device_details_root: get_u64(block, DEVICE_DETAILS_ROOT),
            data_block_size: get_u32(block, DATA_BLOCK_SIZE),
            metadata_block_size: get_u32(block, METADATA_BLOCK_SIZE),
            metadata_nr_blocks: get_u64(block, METADATA_NR_BLOCKS),
            compat_flags: get_u32(block, COMPAT_FLAGS),
            compat_ro_flags: get_u32(block, COMPAT_RO_FLAGS),
            incompat_flags: get_u32(block, INCOMPAT_FLAGS),
        };
        if sb.incompat_flags != 0 {
            return Err(Error::NotFormatted(format!(
                "superblock has incompatible feature flags {:#x}",
                sb.incompat_flags
            )));
        }
        if sb.metadata_block_size != METADATA_BLOCK_SIZE_SECTORS {
            return Err(Error::corrupt(
                location,
                format!(
                    "metadata block size is {} sectors, expected 8",
                    sb.metadata_block_size
                ),
            ));
        }
        if sb.data_block_size == 0 {
            return Err(Error::corrupt(location, "data block size is zero"));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let sb = Superblock {
            flags: NEEDS_CHECK_FLAG,
            uuid: [3; 16],
            version: 1,
            time: 9,
            trans_id: 11,
            held_root: 0,
            data_sm_root: SmRoot {
                nr_blocks: 100,
                nr_allocated: 5,
                bitmap_root: 6,
                ref_count_root: 7,
            },
            metadata_sm_root: SmRoot {
                nr_blocks: 50,
                nr_allocated: 8,
                bitmap_root: 1,
                ref_count_root: 2,
            },
            data_mapping_root: 12,
            device_details_root: 13,
            data_block_size: 128,
            metadata_block_size: 8,
            metadata_nr_blocks: 50,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let b = sb.encode(0);
        assert!(b[SUPERBLOCK_SIZE..].iter().all(|&x| x == 0));
        assert_eq!(Superblock::decode(&b, 0).expect("decodes"), sb);
        assert!(Superblock::decode(&b, 1).is_err());
        assert!(sb.needs_check());
    }
}
