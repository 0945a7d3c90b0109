//! Newtypes for the address spaces the metadata deals in.

/// A thin device id (dm-thin's 24-bit device id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThinId(pub u32);

/// A block of a thin device's virtual address space, in pool data blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VBlock(pub u64);

/// A block of the pool's data device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataBlock(pub u64);

/// The largest thin id dm-thin accepts.
pub const MAX_THIN_ID: u32 = (1 << 24) - 1;

impl std::fmt::Display for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a lookup of one virtual block finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No data block is mapped: reads return zeros.
    Unprovisioned,
    /// Mapped to `data_block`. `shared` is exact: true exactly when another thin (or a held
    /// metadata snapshot) can reach the same data block, so a write must copy it first.
    Provisioned { data_block: DataBlock, shared: bool },
}
