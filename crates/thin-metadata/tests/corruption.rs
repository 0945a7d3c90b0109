//! Corruption test: byte flips in a sample of blocks of every type, read back through the
//! public API. Nothing may panic, and damage must be reported as `Corrupt` naming the block.
//!
//! The image holds several thins, snapshots sharing nodes and data blocks (so both
//! ref-count trees are populated), enough thins for internal nodes in the top-level and
//! details trees, three-level-deep mapping trees and a held metadata snapshot with blocks
//! only it references. Blocks are classified by walking the image with the `format`
//! decoders (`common::blocks`). Per block, a seeded sample of byte positions (always all
//! header bytes) is flipped in two ways:
//!
//! - raw: every byte of every block type is covered by the block's checksum (nodes,
//!   bitmaps and the index block checksum everything after the checksum field; so does the
//!   superblock, unused space included), so nothing is uncovered. A live block must make
//!   open, lookups or walks fail with `Corrupt { block }` naming exactly it (the superblock
//!   magic: `NotFormatted`). A block only the held snapshot references is not read by
//!   open, lookups or walks, so everything must read as before, and releasing the snapshot
//!   (which reads every such block) must fail with `Corrupt` naming it.
//! - resealed (checksum recomputed): exercises the validation behind the checksum. Bytes no
//!   decoder reads (unused entry slots, node padding, the unused parts of the superblock
//!   and its space-map roots, index slots past the last bitmap) must change nothing; the
//!   block number, node flags, max_entries and value size must give `Corrupt` naming the
//!   block; other bytes may change what is read but must never panic.
//!
//! `CORRUPTION_SEED=<n>` picks other positions and masks (default 0);
//! `CORRUPTION_POSITIONS=<n>` sets positions per block (default 64 in release builds, all
//! header bytes included; a smoke run of 4 in debug builds, which are slow at this).

#[allow(dead_code)] // Each test binary uses a different part of the shared model.
mod common;

use block_io::{MemMetaDevice, MetaBlock, MetaDevice, META_BLOCK_SIZE};
use common::blocks::{classify, Info, Kind, Tree};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use thin_metadata::check::{check, CheckOptions};
use thin_metadata::format::{
    max_entries, seal, BITMAP_CSUM_XOR, BTREE_CSUM_XOR, DETAILS_SIZE, INDEX_CSUM_XOR,
    INDEX_ENTRY_SIZE, NODE_HEADER_SIZE, SM_ROOT_SIZE, SUPERBLOCK_CSUM_XOR,
};
use thin_metadata::{
    DeviceDetails, Error, FormatOptions, Lookup, PoolStatus, ThinId, ThinMetadata, VBlock,
};

/// Blocks sampled per kind (and liveness).
const BLOCKS_PER_KIND: usize = 3;
/// Failures listed in the panic message.
const MAX_LISTED: usize = 30;

/// Everything the API answers about the image (mappings as a count and a digest, since
/// thousands of trials compare them).
#[derive(Debug, PartialEq)]
struct Snapshot {
    thins: Vec<(u32, DeviceDetails, u64, u64)>,
    lookups: Vec<Lookup>,
    status: PoolStatus,
}

/// Opens the image and reads everything: every thin's details and mappings, the probe
/// lookups, the status.
fn read_all(dev: Arc<dyn MetaDevice>, probes: &[(u32, u64)]) -> Result<Snapshot, Error> {
    let md = ThinMetadata::open(dev)?;
    read_md(&md, probes)
}

fn read_md(md: &ThinMetadata, probes: &[(u32, u64)]) -> Result<Snapshot, Error> {
    let mut thins = Vec::new();
    for id in md.thins() {
        let (mut n, mut digest) = (0u64, 0u64);
        md.for_each_mapping(id, VBlock(0), |v, b, t| {
            n += 1;
            for x in [v.0, b.0, u64::from(t)] {
                digest = (digest ^ x)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .rotate_left(29);
            }
            true
        })?;
        thins.push((id.0, md.details(id)?, n, digest));
    }
    let lookups = probes
        .iter()
        .map(|&(id, v)| md.lookup(ThinId(id), VBlock(v)))
        .collect::<Result<_, _>>()?;
    Ok(Snapshot {
        thins,
        lookups,
        status: md.status(),
    })
}

/// Builds the image: see the header for what it must contain.
fn build() -> MemMetaDevice {
    let dev = Arc::new(MemMetaDevice::new(4096));
    let opts = FormatOptions {
        data_block_size_sectors: 128,
        nr_data_blocks: 100_000,
    };
    let md = ThinMetadata::format(dev.clone(), opts).expect("format");
    let write = |id: u32, v: u64| {
        let b = md.alloc_data_block().expect("alloc");
        md.insert(ThinId(id), VBlock(v), b).expect("insert");
    };
    md.create_thin(ThinId(0)).expect("create");
    // Enough mappings for a three-level tree.
    for v in 0..70_000 {
        write(0, v);
    }
    md.create_thin(ThinId(10)).expect("create");
    for v in 0..3000 {
        write(10, v);
    }
    md.commit().expect("commit");
    // Snapshots share thin 10's nodes; rewriting one block in each leaf of the first half
    // copies those leaves, so their data blocks reach count 4 (the data ref-count tree),
    // while the second half's leaves stay shared four ways (the metadata ref-count tree).
    for s in 1..=3 {
        md.create_snap(ThinId(s), ThinId(10)).expect("snap");
    }
    for s in 1..=3 {
        for v in (0..1500).step_by(50) {
            write(s, v);
        }
    }
    // More thins than one top-level or details leaf holds.
    for id in 1000..1260 {
        md.create_thin(ThinId(id)).expect("create");
    }
    for v in 0..300 {
        write(1003, v);
    }
    md.commit().expect("commit");
    md.reserve_metadata_snap().expect("reserve");
    md.commit().expect("commit");
    // Now some nodes belong to the held snapshot alone.
    for v in (0..70_000).step_by(500) {
        write(0, v);
    }
    md.delete_thin(ThinId(1003)).expect("delete");
    md.commit().expect("commit");
    MemMetaDevice::from_bytes(&dev.to_bytes())
}

/// Which byte positions of a block no decoder reads (only the checksum covers them).
fn unused(kind: Kind, raw: &[u8], pos: usize) -> bool {
    let u32_at = |off: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&raw[off..off + 4]);
        u32::from_le_bytes(b) as usize
    };
    match kind {
        Kind::Superblock | Kind::HeldSuperblock => {
            // Two 128-byte space-map roots of which 32 bytes are used; nothing after the
            // last field. Offsets follow the field sizes of docs/format.md.
            const DATA_SM_ROOT: usize = 4 + 4 + 8 + 16 + 8 + 4 + 4 + 8 + 8;
            const META_SM_ROOT: usize = DATA_SM_ROOT + SM_ROOT_SIZE;
            const END: usize = META_SM_ROOT + SM_ROOT_SIZE + 8 + 8 + 4 + 4 + 8 + 4 + 4 + 4;
            const _: () = assert!(DATA_SM_ROOT == 64 && END == 364);
            let in_sm_root = |start: usize| (start + 32..start + SM_ROOT_SIZE).contains(&pos);
            in_sm_root(DATA_SM_ROOT) || in_sm_root(META_SM_ROOT) || pos >= END
        }
        Kind::Node { tree, leaf } => {
            let nr = u32_at(16);
            let vs = if leaf { value_size(tree) } else { 8 };
            let max = max_entries(vs);
            let keys_end = NODE_HEADER_SIZE + 8 * nr;
            let vstart = NODE_HEADER_SIZE + 8 * max;
            (28..32).contains(&pos) || (keys_end..vstart).contains(&pos) || pos >= vstart + vs * nr
        }
        // Bytes 4..8 are an unused word; the counts of blocks past the end are zero.
        Kind::Bitmap { .. } => (4..8).contains(&pos),
        // Entries past the last bitmap (the images here have one metadata bitmap).
        Kind::MetaIndex => (4..8).contains(&pos) || pos >= 16 + INDEX_ENTRY_SIZE,
    }
}

fn value_size(tree: Tree) -> usize {
    match tree {
        Tree::MappingTop | Tree::Mapping => 8,
        Tree::Details => DETAILS_SIZE,
        Tree::DataSmIndex => INDEX_ENTRY_SIZE,
        Tree::DataRefCount | Tree::MetaRefCount => 4,
    }
}

fn salt(kind: Kind) -> u32 {
    match kind {
        Kind::Superblock | Kind::HeldSuperblock => SUPERBLOCK_CSUM_XOR,
        Kind::Node { .. } => BTREE_CSUM_XOR,
        Kind::MetaIndex => INDEX_CSUM_XOR,
        Kind::Bitmap { .. } => BITMAP_CSUM_XOR,
    }
}

/// Header bytes whose damage the decoders must reject even under a valid checksum: the
/// block number, and a node's flags, max_entries and value size.
fn must_reject_resealed(kind: Kind, pos: usize) -> bool {
    match kind {
        Kind::Node { .. } => (4..16).contains(&pos) || (20..28).contains(&pos),
        Kind::Bitmap { .. } | Kind::MetaIndex | Kind::Superblock => (8..16).contains(&pos),
        Kind::HeldSuperblock => false,
    }
}

/// The sampled positions of one block: every header byte, then random ones. Fewer than 32
/// (smoke runs) are drawn half from the header, half from the rest.
fn positions(rng: &mut SmallRng, n: usize) -> BTreeSet<usize> {
    let mut p: BTreeSet<usize> = BTreeSet::new();
    if n >= 32 {
        p.extend(0..32);
    }
    while p.len() < n.min(16) / 2 {
        p.insert(rng.gen_range(0..32));
    }
    while p.len() < n {
        p.insert(rng.gen_range(32..META_BLOCK_SIZE));
    }
    p
}

/// The undamaged image with one block replaced: copying the whole image for each of
/// thousands of trials would cost more than the trials. Read-only, as the trials never
/// commit.
#[derive(Debug)]
struct Patched {
    base: Arc<MemMetaDevice>,
    block: u64,
    data: Box<MetaBlock>,
}

impl MetaDevice for Patched {
    fn nr_blocks(&self) -> u64 {
        self.base.nr_blocks()
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        if block == self.block {
            buf.copy_from_slice(&self.data[..]);
            return Ok(());
        }
        self.base.read_block(block, buf)
    }

    fn write_block(&self, block: u64, _: &MetaBlock) -> io::Result<()> {
        Err(io::Error::other(format!(
            "the corruption test's image is read-only (block {block})"
        )))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Trial<'a> {
    base: &'a Arc<MemMetaDevice>,
    reference: &'a Snapshot,
    probes: &'a [(u32, u64)],
    failures: Vec<String>,
    nr_trials: u64,
}

/// What reading a damaged image gave: the snapshot read (if any) and the release result.
type Outcome = Result<(Snapshot, Result<(), Error>), Error>;

impl Trial<'_> {
    /// The offline checker on the damaged image: it must never panic, must report a raw
    /// flip (anywhere, held-only blocks included: it walks the held snapshot) at the
    /// flipped block, must stay clean for bytes no decoder reads, and must report a
    /// resealed block number or node header at the block.
    #[allow(clippy::too_many_arguments)]
    fn run_checker(
        &mut self,
        dev: &dyn MetaDevice,
        b: u64,
        info: Info,
        pos: usize,
        reseal: bool,
        unused: bool,
        what: &str,
    ) {
        let report = match catch_unwind(AssertUnwindSafe(|| check(dev, &CheckOptions::default()))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                self.failures.push(format!("{what}: check PANICKED: {msg}"));
                return;
            }
        };
        let at_block = report.problems.iter().any(|p| p.block == Some(b));
        let problem = if reseal && unused {
            (!report.is_clean()).then(|| format!("check reports an unused byte:\n{report}"))
        } else if !reseal || (info.live && must_reject_resealed(info.kind, pos)) {
            (!at_block).then(|| format!("check reports nothing at block {b}:\n{report}"))
        } else {
            None
        };
        if let Some(p) = problem {
            self.failures.push(format!("{what}: {p}"));
        }
    }

    /// A short description (the snapshot itself is thousands of lines).
    fn describe(&self, o: &Outcome) -> String {
        match o {
            Err(e) => format!("Err({e:?})"),
            Ok((snap, released)) => format!(
                "Ok (reads {}; releasing the held snapshot: {released:?})",
                if snap == self.reference {
                    "as before"
                } else {
                    "differently"
                }
            ),
        }
    }

    fn run(&mut self, b: u64, info: Info, pos: usize, mask: u8, reseal: bool) {
        self.nr_trials += 1;
        let mut raw = Box::new([0u8; META_BLOCK_SIZE]);
        self.base.read_block(b, &mut raw).expect("read");
        let unused = unused(info.kind, &raw[..], pos);
        raw[pos] ^= mask;
        if reseal {
            seal(&mut raw, salt(info.kind));
        }
        let dev: Arc<dyn MetaDevice> = Arc::new(Patched {
            base: self.base.clone(),
            block: b,
            data: raw,
        });
        let what = format!(
            "{:?}{} block {b} byte {pos} ^ {mask:#04x}{}",
            info.kind,
            if info.live { "" } else { " (held only)" },
            if reseal { " resealed" } else { "" }
        );
        self.run_checker(&*dev, b, info, pos, reseal, unused, &what);
        let probes = self.probes;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let md = ThinMetadata::open(dev)?;
            let snap = read_md(&md, probes)?;
            // Releasing the held snapshot reads every block only it references.
            let released = md.release_metadata_snap();
            Ok::<_, Error>((snap, released))
        }));
        let outcome = match outcome {
            Ok(o) => o,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                self.failures.push(format!("{what}: PANIC {msg}"));
                return;
            }
        };
        let names_block = |e: &Error| matches!(e, Error::Corrupt { block, .. } if *block == b);
        let magic = (32..40).contains(&pos) && !reseal;
        let problem = match (&outcome, reseal) {
            // Covered by the checksum only: nothing may change.
            (_, true) if unused => match &outcome {
                Ok((snap, Ok(()))) if snap == self.reference => None,
                o => Some(format!(
                    "an unused byte changed the outcome: {}",
                    self.describe(o)
                )),
            },
            (_, true) if info.live && must_reject_resealed(info.kind, pos) => match &outcome {
                Err(e) if names_block(e) => None,
                o => Some(format!(
                    "expected Corrupt naming block {b}, got {}",
                    self.describe(o)
                )),
            },
            // Any answer but a panic will do.
            (_, true) => None,
            (Err(Error::NotFormatted(_)), false)
                if magic && matches!(info.kind, Kind::Superblock) =>
            {
                None
            }
            (Err(e), false) if info.live && names_block(e) => {
                // Nodes below a root are reported with the path that led to them.
                match (e, info.kind) {
                    (Error::Corrupt { path, .. }, Kind::Node { .. })
                        if info.depth > 0 && path.is_empty() =>
                    {
                        Some(format!(
                            "Corrupt without a path for a node at depth {}",
                            info.depth
                        ))
                    }
                    _ => None,
                }
            }
            (Ok((snap, Err(e))), false) if !info.live => {
                let magic_held = magic && matches!(e, Error::NotFormatted(_));
                if snap != self.reference {
                    Some("damage to a held-only block changed what the live metadata reads".into())
                } else if names_block(e) || magic_held {
                    None
                } else {
                    Some(format!(
                        "releasing the snapshot gave {e}, not Corrupt naming {b}"
                    ))
                }
            }
            (o, false) => Some(format!(
                "expected Corrupt naming block {b}, got {}",
                self.describe(o)
            )),
        };
        if let Some(p) = problem {
            self.failures.push(format!("{what}: {p}"));
        }
    }
}

#[test]
fn flipped_bytes_are_reported_as_corruption_with_their_block() {
    let seed = std::env::var("CORRUPTION_SEED").map_or(0, |s| s.parse().expect("a number"));
    let default_positions = if cfg!(debug_assertions) { 4 } else { 64 };
    let nr_positions = std::env::var("CORRUPTION_POSITIONS")
        .map_or(default_positions, |s| s.parse().expect("a number"));
    let mut rng = SmallRng::seed_from_u64(seed);
    let started = std::time::Instant::now();

    let image = Arc::new(build());
    let blocks = classify(&*image).expect("classifying the image's blocks");
    let mut probes: Vec<(u32, u64)> = Vec::new();
    probes.extend((0..71_000).step_by(997).map(|v| (0, v)));
    for id in [1, 2, 3, 10] {
        probes.extend((0..3100).step_by(37).map(|v| (id, v)));
    }
    probes.extend([(1000, 0), (1259, 5)]);
    let reference = read_all(image.clone(), &probes).expect("the undamaged image reads");
    assert!(
        reference
            .lookups
            .iter()
            .any(|l| matches!(l, Lookup::Provisioned { shared: true, .. })),
        "the image must share data blocks"
    );

    // Up to BLOCKS_PER_KIND blocks of each (kind, live), preferring the deepest nodes.
    let mut by_kind: BTreeMap<(Kind, bool), Vec<(u64, Info)>> = BTreeMap::new();
    for (&b, &info) in &blocks {
        by_kind
            .entry((info.kind, info.live))
            .or_default()
            .push((b, info));
    }
    let required = [
        (Kind::Superblock, true),
        (Kind::HeldSuperblock, false),
        (Kind::MetaIndex, true),
        (Kind::Bitmap { data: true }, true),
        (Kind::Bitmap { data: false }, true),
        (node(Tree::Mapping, true), true),
        (node(Tree::Mapping, false), true),
        (node(Tree::Mapping, true), false),
        (node(Tree::MappingTop, true), true),
        (node(Tree::MappingTop, false), true),
        (node(Tree::Details, true), true),
        (node(Tree::Details, false), true),
        (node(Tree::DataSmIndex, true), true),
        (node(Tree::DataRefCount, true), true),
        (node(Tree::MetaRefCount, true), true),
    ];
    for r in required {
        assert!(
            by_kind.contains_key(&r),
            "the image has no block of kind {r:?}"
        );
    }
    let max_depth = blocks.values().map(|i| i.depth).max().unwrap_or(0);
    assert!(
        max_depth >= 2,
        "the image's mapping trees must have three levels"
    );

    let mut trial = Trial {
        base: &image,
        reference: &reference,
        probes: &probes,
        failures: Vec::new(),
        nr_trials: 0,
    };
    let mut nr_blocks = 0;
    for list in by_kind.values_mut() {
        list.sort_by_key(|(b, i)| (std::cmp::Reverse(i.depth), *b));
        // The deepest block, then others spread over the list.
        let step = (list.len() / BLOCKS_PER_KIND).max(1);
        for &(b, info) in list.iter().step_by(step).take(BLOCKS_PER_KIND) {
            nr_blocks += 1;
            for pos in positions(&mut rng, nr_positions) {
                let mask: u8 = rng.gen_range(1..=255);
                trial.run(b, info, pos, mask, false);
                trial.run(b, info, pos, mask, true);
            }
        }
    }
    println!(
        "CORRUPTION seed={seed} kinds={} blocks={nr_blocks} trials={} failures={} secs={:.1}",
        by_kind.len(),
        trial.nr_trials,
        trial.failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        trial.failures.is_empty(),
        "{} of {} flips misbehaved (CORRUPTION_SEED={seed}); the first ones:\n{}",
        trial.failures.len(),
        trial.nr_trials,
        trial.failures[..trial.failures.len().min(MAX_LISTED)].join("\n")
    );
}

fn node(tree: Tree, leaf: bool) -> Kind {
    Kind::Node { tree, leaf }
}
