//! thin_dump's XML: `dump` writes metadata as thin-provisioning-tools 0.9's `thin_dump`
//! does, byte for byte, and `restore` writes fresh metadata from such XML as `thin_restore`
//! does, after validating all of it.
//!
//! The format, as thin_dump 0.9 writes it: one element a line, two spaces of indent a level.
//!
//! ```text
//! <superblock uuid="" time="1" transaction="6" flags="0" version="2" data_block_size="128" nr_data_blocks="5000">
//!   <device dev_id="1" mapped_blocks="600" transaction="0" creation_time="0" snap_time="1">
//!     <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
//!     <single_mapping origin_block="10" data_block="600" time="1"/>
//!   </device>
//! </superblock>
//! ```
//!
//! - Attributes always in this order; `uuid` is always empty (thin_dump 0.9 does not print
//!   the superblock's uuid bytes).
//! - Devices in id order, each device's mappings in virtual block order. A run of
//!   consecutive virtual blocks mapped to consecutive data blocks with equal times is one
//!   `range_mapping`, however long and whatever tree nodes it spans; a run of one is a
//!   `single_mapping`.
//! - `thin_dump -m` (the held metadata snapshot) prints the copy's superblock fields, and
//!   its `nr_data_blocks` is 0 because the kernel zeroes the copy's space-map roots.
//!
//! What `restore` accepts is what thin_restore 0.9 accepts, less what cannot be right:
//! attributes in any order and either quote, any whitespace between them and between
//! elements, an XML declaration and comments, `<x ...></x>` for `<x .../>`, unknown
//! attributes (ignored), and thin_restore's defaults for a missing `flags` (0) and `version`
//! (1). It refuses, naming the line, what thin_restore would silently get wrong: a virtual
//! block mapped twice, a mapping time above 24 bits, a thin id above 2^24 - 1, negative or
//! overflowing numbers, a `uuid` longer than the 16 bytes it is stored in; and, like
//! thin_restore, unknown elements, missing attributes, a mapping past `nr_data_blocks` and
//! a device listed twice. `mapped_blocks` is recomputed from the mappings (as thin_restore
//! does); the summary says which devices' stated counts were wrong.

mod dump;
mod parse;
mod restore;

pub use dump::dump;
pub use restore::restore;

/// Bytes of the superblock's uuid field, which `uuid="..."` fills from the start.
const ATTR_UUID_BYTES: usize = 16;

/// What to dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Dump the held metadata snapshot instead of the current metadata (`thin_dump -m`).
    pub metadata_snap: bool,
    /// List devices without their mappings (`thin_dump --skip-mappings`).
    pub skip_mappings: bool,
    /// Only this device (`thin_dump --dev-id`); the superblock line is written regardless.
    pub dev_id: Option<u32>,
}

/// A device whose `mapped_blocks` in the XML disagreed with its mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorrectedCount {
    pub dev_id: u32,
    /// What the XML said.
    pub stated: u64,
    /// What its mappings add up to, which the restored metadata records.
    pub actual: u64,
}

/// What a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    pub nr_devices: u64,
    pub nr_mappings: u64,
    /// Distinct data blocks mapped.
    pub nr_data_blocks_used: u64,
    /// Data blocks mapped more than once (shared between snapshots).
    pub nr_shared_data_blocks: u64,
    /// Size of the metadata space (the device's size, up to the format's limit).
    pub nr_metadata_blocks: u64,
    pub nr_metadata_blocks_used: u64,
    pub mapped_blocks_corrected: Vec<CorrectedCount>,
}

#[cfg(test)]
mod tests;
