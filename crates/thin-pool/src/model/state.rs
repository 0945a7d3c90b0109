//! The model's state: the input decisions are read from, and the versions of every block
//! of every thin.
//!
//! Invariants: a block's last version is its current content; a version's `until` is `OPEN`
//! while it may still be visible, and a request closes the versions it replaces when it
//! ends; only the owner of a block adds versions to it (a snapshot's blocks start fresh).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Summary;

/// Reads decisions from the input; past its end every read is 0 and `is_empty` is true.
#[derive(Debug, Clone)]
pub(super) struct Input<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Input<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(super) fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    /// A number in `0..n` (0 when n is 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let v = if n <= 256 {
            u64::from(self.byte())
        } else {
            u64::from(u16::from_le_bytes([self.byte(), self.byte()]))
        };
        v % n
    }

    pub(super) fn ratio(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// The next `n` bytes (fewer at the end) as an input of their own.
    pub(super) fn split(&mut self, n: usize) -> Input<'a> {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        Input::new(&self.data[start..end])
    }
}

/// One version of a block's bytes, and the sequence numbers between which it may have been
/// visible. A request's new version is visible from its start; the version it replaces until
/// its end.
#[derive(Debug, Clone)]
pub(super) struct Version {
    pub(super) from: u64,
    pub(super) until: u64,
    /// `None`: all zeros.
    pub(super) bytes: Option<Arc<[u8]>>,
    /// Whether the block is mapped; `None` when the model cannot tell (zeros either way),
    /// settled by a metadata lookup when the pool is next quiescent.
    pub(super) prov: Option<bool>,
}

pub(super) const OPEN: u64 = u64::MAX;

impl Version {
    pub(super) fn matches(&self, offset: usize, got: &[u8]) -> bool {
        match &self.bytes {
            None => is_zero(got),
            Some(b) => &b[offset..offset + got.len()] == got,
        }
    }
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The versions of one block, the current one last.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) versions: Vec<Version>,
}

impl Block {
    pub(super) fn zero() -> Block {
        Block {
            versions: vec![Version {
                from: 0,
                until: OPEN,
                bytes: None,
                prov: Some(false),
            }],
        }
    }

    pub(super) fn current(&self) -> &Version {
        self.versions.last().expect("a block has a version")
    }

    /// Versions visible at some time in `[s, e]`.
    pub(super) fn visible(&self, s: u64, e: u64) -> impl Iterator<Item = &Version> {
        self.versions
            .iter()
            .filter(move |v| v.from <= e && v.until >= s)
    }

    /// Closes every open version at `e`, then makes `last` current.
    pub(super) fn settle(&mut self, e: u64, last: Version) {
        for v in &mut self.versions {
            if v.until == OPEN {
                v.until = e;
            }
        }
        self.versions.push(Version {
            from: last.from.min(e),
            until: OPEN,
            ..last
        });
    }
}

#[derive(Debug)]
pub(super) struct Model {
    pub(super) seq: u64,
    pub(super) bs: usize,
    pub(super) nr_vblocks: u64,
    pub(super) thins: BTreeMap<u32, Vec<Block>>,
    pub(super) summary: Summary,
}

impl Model {
    pub(super) fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub(super) fn block(&mut self, thin: u32, v: u64) -> &mut Block {
        &mut self.thins.get_mut(&thin).expect("thin in the model")[v as usize]
    }

    /// Bytes unique to this request (never zero), for `len` bytes.
    pub(super) fn stamp(seq: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut i = 0u64;
        while out.len() < len {
            let w = (1u64 << 63) | (seq << 24) | i;
            out.extend_from_slice(&w.to_le_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }
}

/// `cur` with `data` written at `offset`.
pub(super) fn overlay(cur: &Version, bs: usize, offset: usize, data: &[u8]) -> Arc<[u8]> {
    let mut b = match &cur.bytes {
        Some(b) => b.to_vec(),
        None => vec![0; bs],
    };
    b[offset..offset + data.len()].copy_from_slice(data);
    b.into()
}

/// One block's share of a request on a thin.
#[derive(Debug, Clone, Copy)]
pub(super) struct Part {
    pub(super) vblock: u64,
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) buf_off: usize,
}

pub(super) fn split(offset: u64, len: u64, bs: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let in_block = pos % bs;
        let n = (bs - in_block).min(offset + len - pos);
        parts.push(Part {
            vblock: pos / bs,
            offset: in_block as usize,
            len: n as usize,
            buf_off: (pos - offset) as usize,
        });
        pos += n;
    }
    parts
}

/// How a request changes each block it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Write,
    Discard,
    WriteZeroes,
}

pub(super) fn describe(v: &Version, offset: usize, got: &[u8]) -> String {
    let want: Vec<u8> = match &v.bytes {
        None => vec![0; got.len()],
        Some(b) => b[offset..offset + got.len()].to_vec(),
    };
    let first = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
    let show = |b: &[u8]| {
        b[first..(first + 16).min(b.len())]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!(
        "first difference at byte {}: want {} got {}; model version from seq {} prov {:?}",
        offset + first,
        show(&want),
        show(got),
        v.from,
        v.prov
    )
}
