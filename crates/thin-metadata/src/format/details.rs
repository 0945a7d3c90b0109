//! Device details (one per thin) and the packed (data block, time) mapping value.

use super::{get_u32, get_u64, put_u32, put_u64};

/// Size of encoded device details.
pub const DETAILS_SIZE: usize = 24;

/// What dm-thin records for each thin device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    /// Blocks mapped by this thin.
    pub mapped_blocks: u64,
    /// The pool's transaction id when the thin was created.
    pub transaction_id: u64,
    /// Pool time when the thin was created.
    pub creation_time: u32,
    /// Pool time of the last snapshot this thin took part in.
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    /// Encodes into 24 bytes.
    pub fn encode(&self) -> [u8; DETAILS_SIZE] {
        let mut b = [0u8; DETAILS_SIZE];
        put_u64(&mut b, 0, self.mapped_blocks);
        put_u64(&mut b, 8, self.transaction_id);
        put_u32(&mut b, 16, self.creation_time);
        put_u32(&mut b, 20, self.snapshotted_time);
        b
    }

    /// Decodes from 24 bytes (shorter input reads as zeros).
    pub fn decode(b: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: get_u64(b, 0),
            transaction_id: get_u64(b, 8),
            creation_time: get_u32(b, 16),
            snapshotted_time: get_u32(b, 20),
        }
    }
}

/// Bits of the mapping value that hold the time.
const TIME_BITS: u32 = 24;
/// The largest data block a mapping value can hold (40 bits).
pub const MAX_DATA_BLOCK: u64 = (1 << (64 - TIME_BITS)) - 1;

/// Packs a data block and a 24-bit time into a mapping value.
pub fn pack_block_time(data_block: u64, time: u32) -> u64 {
    debug_assert!(data_block <= MAX_DATA_BLOCK);
    (data_block << TIME_BITS) | u64::from(time & ((1 << TIME_BITS) - 1))
}

/// Splits a mapping value into (data block, time).
pub fn unpack_block_time(v: u64) -> (u64, u32) {
    (v >> TIME_BITS, (v & ((1 << TIME_BITS) - 1)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let d = DeviceDetails {
            mapped_blocks: 1,
            transaction_id: 2,
            creation_time: 3,
            snapshotted_time: 4,
        };
        assert_eq!(DeviceDetails::decode(&d.encode()), d);
        assert_eq!(
            unpack_block_time(pack_block_time(MAX_DATA_BLOCK, 0xabcdef)),
            (MAX_DATA_BLOCK, 0xabcdef)
        );
        assert_eq!(unpack_block_time(pack_block_time(5, 0x1_000_001)), (5, 1));
    }
}
