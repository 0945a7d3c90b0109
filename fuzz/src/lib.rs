//! Fuzz harnesses for the metadata crate and the whole-pool model, shared by the cargo-fuzz
//! targets (fuzz_targets/) and the seeded smoke test (tests/smoke.rs), which runs them on
//! stable Rust.
//!
//! What must NOT happen, whatever the input: a panic, an endless loop, or an allocation
//! proportional to a number read from disk rather than to the device's size. Errors are
//! fine; they are what damaged metadata should produce.
//!
//! Random bytes almost never carry a valid checksum, so each harness also re-seals what it
//! decodes with the right salt and block number: that lets the fuzzer past `verify` into the
//! field checks behind it, which is where a decoder could go wrong.
#![forbid(unsafe_code)]

use block_io::{MemMetaDevice, MetaBlock, META_BLOCK_SIZE};
use std::sync::{Arc, OnceLock};
use thin_metadata::check::{check, CheckOptions};
use thin_metadata::format::{
    self, decode_bitmap, decode_metadata_index, encode_bitmap, unpack_block_time, IndexEntry, Node,
    SmRoot, Superblock, BITMAP_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, SUPERBLOCK_CSUM_XOR,
};
use thin_metadata::{DeviceDetails, FormatOptions, Lookup, ThinId, ThinMetadata, VBlock};

/// The checksum salts of the four block types, each with a name for messages.
pub const SALTS: [(u32, &str); 4] = [
    (SUPERBLOCK_CSUM_XOR, "superblock"),
    (BTREE_CSUM_XOR, "btree node"),
    (INDEX_CSUM_XOR, "metadata index"),
    (BITMAP_CSUM_XOR, "bitmap"),
];

/// Leaf value sizes of the trees dm-thin keeps: ref counts (4), mappings, roots and index
/// entries of the data space map (8 and 16), device details (24).
const VALUE_SIZES: [usize; 4] = [4, 8, 16, 24];

/// Most mappings a harness walks per thin: a damaged tree may share one subtree many times.
const MAX_WALK: usize = 4096;

/// Most thins a harness visits after a successful open.
const MAX_THINS: usize = 8;

/// `data` padded with zeros or truncated to one block.
pub fn to_block(data: &[u8]) -> Box<MetaBlock> {
    let mut b = Box::new([0u8; META_BLOCK_SIZE]);
    let n = data.len().min(META_BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    b
}

/// The block number a block claims for itself (bytes 8..16): decoding it at that location
/// gets past the misdirected-write check.
fn self_location(b: &MetaBlock) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&b[8..16]);
    u64::from_le_bytes(le)
}

/// Runs every decoder of `thin_metadata::format` on `data` (padded or truncated to one
/// block), both as given and re-sealed with each block type's salt. Panics only on a bug:
/// a decoder that panics, or a successful decode that does not survive an encode round trip.
pub fn decode_blocks(data: &[u8]) {
    let raw = to_block(data);
    let at = self_location(&raw);
    // The first input byte also picks an entry count for the index decoder.
    let nr_index = usize::from(data.first().copied().unwrap_or(0));

    for loc in [at, 0, 1] {
        decode_all(&raw, loc, nr_index);
    }
    for (salt, _) in SALTS {
        let mut b = raw.clone();
        format::seal(&mut b, salt);
        decode_all(&b, at, nr_index);
    }

    // The field decoders take slices of any length (short input reads as zeros).
    for len in [0, 1, 7, 15, 16, 23, 24, 31, 32, 128] {
        let s = data.get(..len.min(data.len())).unwrap_or(&[]);
        let _ = IndexEntry::decode(s);
        let _ = DeviceDetails::decode(s);
        let _ = SmRoot::decode(s);
    }
    let e = IndexEntry::decode(data);
    assert_eq!(IndexEntry::decode(&e.encode()), e, "index entry round trip");
    let d = DeviceDetails::decode(data);
    assert_eq!(
        DeviceDetails::decode(&d.encode()),
        d,
        "device details round trip"
    );
    let r = SmRoot::decode(data);
    let mut rb = [0u8; format::SM_ROOT_SIZE];
    r.encode(&mut rb);
    assert_eq!(SmRoot::decode(&rb), r, "space map root round trip");
    let (block, time) = unpack_block_time(at);
    assert_eq!(
        unpack_block_time(format::pack_block_time(block, time)),
        (block, time),
        "block/time round trip"
    );
    for i in [0, 1, at, u64::MAX] {
        let _ = format::bitmap_get(&raw[..], i);
    }
}

/// Every block decoder on one block at one location; successful decodes must round-trip.
fn decode_all(b: &MetaBlock, loc: u64, nr_index: usize) {
    if let Ok(sb) = Superblock::decode(b, loc) {
        let again = Superblock::decode(&sb.encode(loc), loc).expect("re-encoded superblock");
        assert_eq!(again, sb, "superblock round trip");
    }
    for vs in VALUE_SIZES {
        if let Ok(node) = Node::decode(b, loc, vs) {
            assert!(node.nr_entries() <= node.max_entries());
            let again = Node::decode(&node.encode(loc), loc, vs).expect("re-encoded node");
            assert_eq!(again, node, "node round trip");
        }
    }
    if let Ok(bits) = decode_bitmap(b, loc) {
        let again = decode_bitmap(&encode_bitmap(&bits, loc), loc).expect("re-encoded bitmap");
        assert_eq!(again[..], bits[..], "bitmap round trip");
    }
    for nr in [0, 1, nr_index, 255, 256, usize::MAX] {
        if let Ok(entries) = decode_metadata_index(b, loc, nr) {
            assert!(entries.len() <= nr.min(format::MAX_METADATA_BITMAPS));
            let again = decode_metadata_index(
                &format::encode_metadata_index(&entries, loc),
                loc,
                entries.len(),
            )
            .expect("re-encoded index");
            assert_eq!(again, entries, "index round trip");
        }
    }
}

/// A small valid pool image and the blocks of it worth damaging.
#[derive(Debug)]
pub struct BaseImage {
    /// The whole metadata device.
    pub bytes: Vec<u8>,
    /// Blocks that hold something (the rest are zero).
    pub used_blocks: Vec<u64>,
}

/// Metadata blocks of the base image.
const BASE_META_BLOCKS: u64 = 256;

/// Builds the image `open_metadata` damages: three thins (one origin and two snapshots, so
/// some data blocks have a count of 3 and need the reference-count tree), trees two levels
/// deep, a held metadata snapshot, and a second transaction on top.
pub fn base_image() -> &'static BaseImage {
    static IMAGE: OnceLock<BaseImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dev = Arc::new(MemMetaDevice::new(BASE_META_BLOCKS));
        let md = ThinMetadata::format(
            dev.clone(),
            FormatOptions {
                data_block_size_sectors: 128,
                nr_data_blocks: 20_000,
            },
        )
        .expect("format the base image");
        let map = |thin: u32, v: u64| {
            let db = md.alloc_data_block().expect("alloc");
            md.insert(ThinId(thin), VBlock(v), db).expect("insert");
        };
        md.create_thin(ThinId(0)).expect("create thin 0");
        for v in 0..600 {
            map(0, v * 3);
        }
        md.commit().expect("commit 1");
        md.create_snap(ThinId(1), ThinId(0)).expect("snapshot 1");
        md.create_snap(ThinId(7), ThinId(0)).expect("snapshot 7");
        for v in 0..40 {
            map(1, v * 5);
        }
        md.commit().expect("commit 2");
        md.reserve_metadata_snap()
            .expect("hold a metadata snapshot");
        for v in 0..20 {
            map(7, 10_000 + v);
        }
        md.remove_range(ThinId(0), VBlock(300), VBlock(600))
            .expect("remove range");
        md.commit().expect("commit 3");
        let bytes = dev.to_bytes();
        let used_blocks = bytes
            .chunks_exact(META_BLOCK_SIZE)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, _)| i as u64)
            .collect();
        BaseImage { bytes, used_blocks }
    })
}

/// Reads little-endian fields off the front of the fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) | u16::from(self.u8()?) << 8)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// The base image damaged as `data` says, and the virtual blocks to look up.
///
/// The input is a list of patches: block selector (u8, an index into the used blocks),
/// offset (u16), flags (u8: bits 0..6 the length, bit 7 "re-seal"), then the bytes. A re-sealed
/// block gets a valid checksum for the type it had, so the damage reaches the code behind
/// checksum verification. What is left of the input after the patches picks the lookups.
pub fn damaged_image(data: &[u8]) -> (Vec<u8>, Vec<u64>) {
    let base = base_image();
    let mut bytes = base.bytes.clone();
    let mut input = Input(data);
    // Patches past this many are ignored: a few well-placed ones say everything.
    for _ in 0..16 {
        let (Some(sel), Some(off), Some(flags)) = (input.u8(), input.u16(), input.u8()) else {
            break;
        };
        let Some(&block) = base
            .used_blocks
            .get(usize::from(sel) % base.used_blocks.len())
        else {
            break;
        };
        let patch = input.bytes(usize::from(flags & 0x7f));
        let start = block as usize * META_BLOCK_SIZE;
        let b: &mut MetaBlock = (&mut bytes[start..start + META_BLOCK_SIZE])
            .try_into()
            .expect("one block");
        let salt = SALTS
            .iter()
            .find(|(salt, what)| format::verify(b, block, *salt, what).is_ok())
            .map(|(salt, _)| *salt);
        let off = usize::from(off) % META_BLOCK_SIZE;
        let end = (off + patch.len()).min(META_BLOCK_SIZE);
        b[off..end].copy_from_slice(&patch[..end - off]);
        if let (Some(salt), true) = (salt, flags & 0x80 != 0) {
            format::seal(b, salt);
        }
    }
    let probes = input
        .0
        .chunks(2)
        .take(64)
        .map(|c| u64::from(c[0]) | u64::from(c.get(1).copied().unwrap_or(0)) << 8)
        .collect();
    (bytes, probes)
}

/// Damages the base image as `data` says (see `damaged_image`), opens it, and reads
/// everything it can.
pub fn open_metadata(data: &[u8]) {
    let (bytes, probes) = damaged_image(data);
    let dev = Arc::new(MemMetaDevice::from_bytes(&bytes));
    let Ok(md) = ThinMetadata::open(dev) else {
        return;
    };
    read_everything(&md, &probes);
}

/// Damages the base image as `data` says and runs the offline checker on it, with and
/// without the mapping trees. The checker must not panic, and metadata it calls clean must
/// open: otherwise one of the two is wrong about what valid metadata is.
pub fn check_metadata(data: &[u8]) {
    let (bytes, _) = damaged_image(data);
    let dev = Arc::new(MemMetaDevice::from_bytes(&bytes));
    let fast = check(
        &*dev,
        &CheckOptions {
            skip_mappings: true,
            ..CheckOptions::default()
        },
    );
    let full = check(&*dev, &CheckOptions::default());
    if full.is_clean() {
        assert!(
            fast.is_clean(),
            "a full check is clean but a fast one is not"
        );
        if let Err(e) = ThinMetadata::open(dev) {
            panic!("the checker finds nothing wrong, but open fails: {e}");
        }
    }
}

/// Every read path of opened (possibly damaged) metadata, bounded. Only panics count as
/// failures: what damaged metadata answers is its own business (the checker judges that).
pub fn read_everything(md: &ThinMetadata, probes: &[u64]) {
    let _ = md.status();
    for thin in md.thins().into_iter().take(MAX_THINS) {
        let _ = md.details(thin);
        let mut blocks = Vec::new();
        for &v in probes
            .iter()
            .chain(&[0, 1, 3, 299, 300, 1797, 10_000, u64::MAX])
        {
            if let Ok(Lookup::Provisioned { data_block, .. }) = md.lookup(thin, VBlock(v)) {
                blocks.push(data_block);
            }
        }
        let _ = md.for_each_mapping(thin, VBlock(0), |_v, db, _time| {
            blocks.push(db);
            blocks.len() < MAX_WALK
        });
        for db in blocks {
            let _ = md.data_block_count(db);
        }
    }
}

/// The whole-pool model (`thin_pool::model`) driven by `data`: concurrent requests,
/// snapshots, deletes and reopens on a small in-memory pool, checked against a byte-level
/// model of every thin. Panics on any disagreement, or on an error a pool must not return.
pub fn pool_model(data: &[u8]) {
    thin_pool::model::run(data, &thin_pool::model::Options::fuzz());
}
