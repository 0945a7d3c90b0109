//! Writing metadata as thin_dump 0.9 writes it.
//!
//! The dump reads the superblock, the device details tree and the mapping trees, nothing
//! else: it does not need the space maps, so it works on metadata whose space maps are
//! damaged, on the held metadata snapshot (whose space-map roots are zero), and on
//! metadata the kernel wrote.
//!
//! Invariants:
//! - it never writes to the device;
//! - every block is validated as it is read (checksum, block number, node header, keys in
//!   order), node pointers stay inside the device, descent is bounded by `MAX_HEIGHT`, and
//!   the keys a tree yields must strictly increase across leaves; so damage is an error
//!   naming the block, and no input makes the dump loop or visit a node twice in one walk;
//! - output is byte for byte what thin_dump 0.9 writes for the same metadata.

use super::DumpOptions;
use crate::btree::MAX_HEIGHT;
use crate::error::{Error, Result};
use crate::format::{
    get_u64, unpack_block_time, DeviceDetails, MetaBlock, Node, NodeKind, Superblock, DETAILS_SIZE,
    SUPERBLOCK_LOCATION,
};
use block_io::MetaDevice;
use std::io::{BufWriter, Write};

/// Output is buffered in chunks of this size.
const OUT_BUFFER_BYTES: usize = 256 * 1024;

/// Writes the metadata on `dev` as thin_dump XML.
pub fn dump(dev: &dyn MetaDevice, out: &mut dyn Write, opts: &DumpOptions) -> Result<()> {
    let reader = Reader { dev };
    let sb_raw = reader.read(SUPERBLOCK_LOCATION)?;
    if Superblock::is_blank(&sb_raw) {
        return Err(Error::NotFormatted(
            "the metadata device is blank (all zeros)".into(),
        ));
    }
    let mut sb = Superblock::decode(&sb_raw, SUPERBLOCK_LOCATION)?;
    if opts.metadata_snap {
        let held = sb.held_root;
        if held == 0 {
            return Err(Error::InvalidArgument(
                "no metadata snapshot is held (dm-thin's reserve_metadata_snap message takes \
                 one)"
                    .into(),
            ));
        }
        reader.check_pointer(held, &[])?;
        sb = Superblock::decode(&*reader.read(held)?, held)?;
    }
    // The held copy's space-map roots are zero, as the kernel leaves them, and thin_dump -m
    // prints its zero data size.
    let nr_data_blocks = sb.data_sm_root.nr_blocks;

    let mut details: Vec<(u64, DeviceDetails)> = Vec::new();
    reader.walk(sb.device_details_root, DETAILS_SIZE, &mut |k, v| {
        details.push((k, DeviceDetails::decode(v)));
        Ok(())
    })?;
    let mut roots: Vec<(u64, u64)> = Vec::new();
    reader.walk(sb.data_mapping_root, 8, &mut |k, v| {
        roots.push((k, get_u64(v, 0)));
        Ok(())
    })?;
    if let Some(reason) = first_unpaired(&details, &roots) {
        return Err(Error::corrupt(sb.device_details_root, reason));
    }

    let mut w = BufWriter::with_capacity(OUT_BUFFER_BYTES, out);
    let io = |source| Error::Stream {
        op: "writing the XML dump",
        source,
    };
    writeln!(
        w,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" \
         data_block_size=\"{}\" nr_data_blocks=\"{nr_data_blocks}\">",
        sb.time, sb.trans_id, sb.flags, sb.version, sb.data_block_size
    )
    .map_err(io)?;
    for ((id, d), (_, root)) in details.iter().zip(&roots) {
        if opts.dev_id.is_some_and(|want| u64::from(want) != *id) {
            continue;
        }
        writeln!(
            w,
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"{}\" \
             creation_time=\"{}\" snap_time=\"{}\">",
            d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time
        )
        .map_err(io)?;
        if !opts.skip_mappings {
            let mut run: Option<Run> = None;
            reader.walk(*root, 8, &mut |v, value| {
                let (data, time) = unpack_block_time(get_u64(value, 0));
                match &mut run {
                    Some(r) if r.extends_to(v, data, time) => r.len += 1,
                    _ => {
                        if let Some(r) = run.replace(Run {
                            origin: v,
                            data,
                            time,
                            len: 1,
                        }) {
                            r.write(&mut w).map_err(io)?;
                        }
                    }
                }
                Ok(())
            })?;
            if let Some(r) = run {
                r.write(&mut w).map_err(io)?;
            }
        }
        writeln!(w, "  </device>").map_err(io)?;
    }
    writeln!(w, "</superblock>").map_err(io)?;
    w.flush().map_err(io)
}

/// Says which thin is in only one of the device details tree and the mapping tree (both
/// sorted by id), if any.
fn first_unpaired(details: &[(u64, DeviceDetails)], roots: &[(u64, u64)]) -> Option<String> {
    let mut d = details.iter().map(|e| e.0).peekable();
    let mut r = roots.iter().map(|e| e.0).peekable();
    loop {
        let (only_in, id) = match (d.peek(), r.peek()) {
            (None, None) => return None,
            (Some(a), Some(b)) if a == b => {
                d.next();
                r.next();
                continue;
            }
            (Some(&a), Some(&b)) if a < b => ("device details tree", a),
            (Some(_), Some(&b)) | (None, Some(&b)) => ("mapping tree", b),
            (Some(&a), None) => ("device details tree", a),
        };
        let other = if only_in == "mapping tree" {
            "device details tree"
        } else {
            "mapping tree"
        };
        return Some(format!(
            "thin {id} is in the {only_in} but not in the {other}"
        ));
    }
}

/// Consecutive virtual blocks mapped to consecutive data blocks with one time: thin_dump
/// writes each as one element, whatever leaves and nodes it spans.
#[derive(Debug, Clone, Copy)]
struct Run {
    origin: u64,
    data: u64,
    time: u32,
    len: u64,
}

impl Run {
    fn extends_to(&self, v: u64, data: u64, time: u32) -> bool {
        time == self.time
            && self.origin.checked_add(self.len) == Some(v)
            && self.data.checked_add(self.len) == Some(data)
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        if self.len == 1 {
            writeln!(
                w,
                "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
                self.origin, self.data, self.time
            )
        } else {
            writeln!(
                w,
                "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" \
                 time=\"{}\"/>",
                self.origin, self.data, self.len, self.time
            )
        }
    }
}

/// Reads and validates blocks for the dump.
struct Reader<'d> {
    dev: &'d dyn MetaDevice,
}

/// What a leaf entry visitor gets: key and value bytes.
type Visit<'f> = dyn FnMut(u64, &[u8]) -> Result<()> + 'f;

impl Reader<'_> {
    fn read(&self, b: u64) -> Result<Box<MetaBlock>> {
        crate::store::read_block(self.dev, b)
    }

    /// A pointer to a node or superblock copy must name a block of the device other than
    /// the superblock.
    fn check_pointer(&self, b: u64, path: &[u64]) -> Result<()> {
        let nr = self.dev.nr_blocks();
        if b == SUPERBLOCK_LOCATION || b >= nr {
            return Err(Error::Corrupt {
                block: path.last().copied().unwrap_or(SUPERBLOCK_LOCATION),
                path: path.to_vec(),
                reason: format!("pointer to block {b}, outside the metadata area 1..{nr}"),
            });
        }
        Ok(())
    }

    fn node(&self, b: u64, value_size: usize, path: &[u64]) -> Result<Node> {
        self.check_pointer(b, path)?;
        let raw = self.read(b)?;
        Node::decode(&raw, b, value_size).map_err(|e| crate::btree::with_path(e, path))
    }

    /// Calls `visit(key, value)` for every leaf entry of the tree at `root`, in key order.
    fn walk(&self, root: u64, value_size: usize, visit: &mut Visit<'_>) -> Result<()> {
        let corrupt = |block: u64, path: &[u64], reason: String| Error::Corrupt {
            block,
            path: path.to_vec(),
            reason,
        };
        // Each level: the node's block, the node, and the next entry to visit.
        let mut stack: Vec<(u64, Node, usize)> = Vec::with_capacity(MAX_HEIGHT);
        let mut path: Vec<u64> = Vec::with_capacity(MAX_HEIGHT);
        stack.push((root, self.node(root, value_size, &[])?, 0));
        path.push(root);
        let mut last_key: Option<u64> = None;
        loop {
            let depth = stack.len();
            let Some((b, node, i)) = stack.last_mut() else {
                break;
            };
            let b = *b;
            let is_root = depth == 1;
            if *i == 0 && node.nr_entries() == 0 && (!is_root || node.kind == NodeKind::Internal) {
                return Err(corrupt(b, &path, "btree node has no entries".into()));
            }
            match node.kind {
                NodeKind::Leaf => {
                    for (j, &k) in node.keys.iter().enumerate() {
                        if let Some(last) = last_key.filter(|&last| k <= last) {
                            return Err(corrupt(
                                b,
                                &path,
                                format!(
                                    "key {k} follows key {last} of an earlier leaf (keys out of \
                                     order across nodes, or a node shared within one tree)"
                                ),
                            ));
                        }
                        last_key = Some(k);
                        visit(k, node.value(j))?;
                    }
                    stack.pop();
                    path.pop();
                }
                NodeKind::Internal if *i >= node.nr_entries() => {
                    stack.pop();
                    path.pop();
                }
                NodeKind::Internal => {
                    let child = node.value_u64(*i);
                    *i += 1;
                    if depth >= MAX_HEIGHT {
                        return Err(corrupt(
                            root,
                            &path,
                            format!("btree deeper than {MAX_HEIGHT} levels (a cycle?)"),
                        ));
                    }
                    let n = self.node(child, value_size, &path)?;
                    stack.push((child, n, 0));
                    path.push(child);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaired_thins_are_named() {
        let d = |ids: &[u64]| -> Vec<(u64, DeviceDetails)> {
            ids.iter().map(|&i| (i, DeviceDetails::default())).collect()
        };
        let r = |ids: &[u64]| -> Vec<(u64, u64)> { ids.iter().map(|&i| (i, 1)).collect() };
        assert_eq!(first_unpaired(&d(&[1, 2, 5]), &r(&[1, 2, 5])), None);
        assert_eq!(first_unpaired(&d(&[]), &r(&[])), None);
        let cases: [(&[u64], &[u64], &str); 4] = [
            (
                &[1, 3],
                &[1, 2, 3],
                "thin 2 is in the mapping tree but not in the device details tree",
            ),
            (
                &[1, 2, 3],
                &[1, 3],
                "thin 2 is in the device details tree but not in the mapping tree",
            ),
            (&[1], &[1, 7], "thin 7 is in the mapping tree"),
            (&[1, 9], &[1], "thin 9 is in the device details tree"),
        ];
        for (details, roots, want) in cases {
            let got = first_unpaired(&d(details), &r(roots)).expect("a thin is unpaired");
            assert!(got.starts_with(want), "{got}");
        }
    }
}
