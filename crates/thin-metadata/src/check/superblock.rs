//! The superblock and the held snapshot's copy of it.
//!
//! Invariants: a superblock that does not decode (blank, wrong magic, bad checksum, wrong
//! block number, unsupported version or features) stops the check, because every other
//! structure is found through it; size fields that disagree with the device are reported and
//! the walk is confined to the blocks that exist, so it never reads past the device.

use super::report::{Problem, ProblemKind};
use super::walk::Walker;
use crate::error::Error;
use crate::format::details::MAX_DATA_BLOCK;
use crate::format::{MetaBlock, Superblock, MAX_METADATA_BLOCKS, SUPERBLOCK_LOCATION};
use block_io::MetaDevice;

/// The sizes the walk is confined to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    /// Metadata blocks that can be addressed: the space map's size, limited by the device
    /// and the format.
    pub nr_meta: u64,
    /// Data blocks, limited by what a mapping can address.
    pub nr_data: u64,
}

/// Decodes the superblock copy at `location`, or says why it cannot be used.
pub(super) fn decode(raw: &MetaBlock, location: u64) -> Result<Superblock, String> {
    if Superblock::is_blank(raw) {
        return Err(format!(
            "block {location} is all zeros: no dm-thin metadata here (unformatted?)"
        ));
    }
    Superblock::decode(raw, location).map_err(|e| match e {
        Error::Corrupt { reason, .. } => reason,
        Error::NotFormatted(why) => why,
        e => e.to_string(),
    })
}

/// Reads and validates the superblock at block 0. On failure the one problem says why.
pub(super) fn read_current(dev: &dyn MetaDevice) -> Result<Superblock, Problem> {
    let problem = |why: String| Problem::new(ProblemKind::Superblock, why).at(SUPERBLOCK_LOCATION);
    if dev.nr_blocks() == 0 {
        return Err(problem("the metadata device is empty".into()));
    }
    let mut raw = crate::format::zeroed_block();
    dev.read_block(SUPERBLOCK_LOCATION, &mut raw).map_err(|e| {
        Problem::new(ProblemKind::Io, format!("cannot read the superblock: {e}")).at(0)
    })?;
    decode(&raw, SUPERBLOCK_LOCATION).map_err(|why| problem(format!("superblock: {why}")))
}

/// Checks the superblock's sizes against the device and the format; returns the sizes the
/// walk may use and the problems found.
pub(super) fn geometry(sb: &Superblock, dev_nr_blocks: u64) -> (Geometry, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut problem = |why: String| {
        problems.push(Problem::new(ProblemKind::Superblock, why).at(SUPERBLOCK_LOCATION));
    };
    let sm_nr = sb.metadata_sm_root.nr_blocks;
    if sm_nr == 0 {
        problem("metadata space map has no blocks".into());
    }
    if sm_nr > dev_nr_blocks {
        problem(format!(
            "metadata space map has {sm_nr} blocks but the device holds only {dev_nr_blocks}"
        ));
    }
    if sm_nr > MAX_METADATA_BLOCKS {
        problem(format!(
            "metadata space map has {sm_nr} blocks, more than the format's {MAX_METADATA_BLOCKS}"
        ));
    }
    if sb.metadata_nr_blocks > dev_nr_blocks {
        problem(format!(
            "metadata_nr_blocks is {} but the device holds only {dev_nr_blocks} blocks",
            sb.metadata_nr_blocks
        ));
    }
    let data_nr = sb.data_sm_root.nr_blocks;
    if data_nr > MAX_DATA_BLOCK + 1 {
        problem(format!(
            "data space map has {data_nr} blocks, more than a mapping can address"
        ));
    }
    let usable = dev_nr_blocks.min(MAX_METADATA_BLOCKS);
    let nr_meta = if sm_nr == 0 {
        usable
    } else {
        sm_nr.min(usable)
    };
    let geometry = Geometry {
        nr_meta,
        nr_data: data_nr.min(MAX_DATA_BLOCK + 1),
    };
    (geometry, problems)
}

/// Counts and validates the held snapshot's superblock copy; returns it when it can be used.
pub(super) fn read_held(w: &mut Walker<'_>, held: u64) -> Option<Superblock> {
    let copy = read_held_copy(w, held);
    w.incomplete |= copy.is_none();
    copy
}

fn read_held_copy(w: &mut Walker<'_>, held: u64) -> Option<Superblock> {
    if !w.in_meta_area(held) {
        let detail = format!(
            "held metadata snapshot at block {held}, outside the metadata area 1..{}",
            w.nr_meta
        );
        w.report(
            Some(SUPERBLOCK_LOCATION),
            ProblemKind::OutOfRange,
            None,
            detail,
        );
        return None;
    }
    w.meta.inc(held);
    let raw = match w.read(held) {
        Ok(raw) => raw,
        Err(why) => {
            w.report(Some(held), ProblemKind::Io, None, why);
            return None;
        }
    };
    match decode(&raw, held) {
        Ok(copy) => Some(copy),
        Err(why) => {
            let detail = format!("superblock copy: {why}");
            w.report(Some(held), ProblemKind::Superblock, None, detail);
            None
        }
    }
}
