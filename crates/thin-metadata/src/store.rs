//! The block store: reads, caches and allocates metadata blocks within a transaction.
//!
//! Invariants:
//! - a node of the last committed state is never modified: writers get a copy in a newly
//!   allocated block (`btree::shadow`), and `dirty` holds every node written this
//!   transaction, which is the only set of nodes the next commit writes;
//! - nodes handed to an in-flight commit stay in `committing` until their write is durable,
//!   so a reader never re-reads a block from disk before its new contents reach it;
//! - a block whose count drops to zero leaves `dirty` and the cache at once.

use crate::error::{Error, Result, Space};
use crate::format::{MetaBlock, Node, NodeKind, SUPERBLOCK_LOCATION};
use crate::space_map::SpaceMap;
use block_io::MetaDevice;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Hashes metadata block numbers for the store's maps, which every lookup consults: one
/// multiply (FxHash's), where std's SipHash costs hundreds of instructions per lookup. Block
/// numbers come from our own allocator or from the metadata being read; a damaged or hostile
/// device could at worst make its own lookups slower, which SipHash's key would not prevent
/// anyway for values that are not secret.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by metadata block number.
pub(crate) type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// Default number of clean nodes kept in memory (64 MiB of 4 KiB nodes).
pub const DEFAULT_CACHE_NODES: usize = 16384;

/// A bounded cache of clean nodes with approximate LRU eviction: each hit stamps the entry,
/// and when the cache is over capacity the oldest eighth is dropped in one pass.
#[derive(Debug)]
struct NodeCache {
    map: BlockMap<(Arc<Node>, u64)>,
    clock: u64,
    capacity: usize,
}

impl NodeCache {
    fn get(&mut self, b: u64) -> Option<Arc<Node>> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(&b).map(|(n, stamp)| {
            *stamp = clock;
            n.clone()
        })
    }

    fn insert(&mut self, b: u64, n: Arc<Node>) {
        self.clock += 1;
        self.map.insert(b, (n, self.clock));
        if self.map.len() > self.capacity {
            let mut stamps: Vec<u64> = self.map.values().map(|(_, s)| *s).collect();
            let cut = stamps.len() / 8;
            let (_, threshold, _) = stamps.select_nth_unstable(cut);
            let threshold = *threshold;
            self.map.retain(|_, (_, s)| *s > threshold);
        }
    }
}

/// Shards of the node cache: lookups on different threads mostly take different mutexes,
/// each on its own cache line, instead of all bouncing one.
const CACHE_SHARDS: usize = 16;

#[derive(Debug)]
#[repr(align(128))]
struct CacheShard(Mutex<NodeCache>);

/// Metadata blocks, their cache, and the reference counts of both spaces.
#[derive(Debug)]
pub(crate) struct Store {
    pub dev: Arc<dyn MetaDevice>,
    cache: Box<[CacheShard]>,
    /// Nodes written in the current transaction (all in blocks allocated in it).
    pub dirty: BlockMap<Arc<Node>>,
    /// Nodes of a commit whose writes are not yet durable.
    pub committing: BlockMap<Arc<Node>>,
    pub meta_sm: SpaceMap,
    pub data_sm: SpaceMap,
    /// Metadata blocks ordinary allocations leave free so that a commit can always finish.
    pub meta_reserve: u64,
    /// Set while a commit writes back the space maps: it may use the reserve.
    pub in_commit: bool,
}

impl Store {
    pub fn new(dev: Arc<dyn MetaDevice>, meta_sm: SpaceMap, data_sm: SpaceMap) -> Self {
        Store {
            dev,
            cache: (0..CACHE_SHARDS)
                .map(|_| {
                    CacheShard(Mutex::new(NodeCache {
                        map: BlockMap::default(),
                        clock: 0,
                        capacity: DEFAULT_CACHE_NODES / CACHE_SHARDS,
                    }))
                })
                .collect(),
            dirty: BlockMap::default(),
            committing: BlockMap::default(),
            meta_sm,
            data_sm,
            meta_reserve: 0,
            in_commit: false,
        }
    }

    fn shard(&self, b: u64) -> &Mutex<NodeCache> {
        // Neighbouring blocks (often written together) land in different shards.
        &self.cache[(b % CACHE_SHARDS as u64) as usize].0
    }

    /// Sets how many clean nodes the cache keeps.
    pub fn set_cache_capacity(&self, nodes: usize) {
        for shard in self.cache.iter() {
            shard.0.lock().capacity = (nodes / CACHE_SHARDS).max(64);
        }
    }

    /// Reads a raw block from the device.
    pub fn read_raw(&self, b: u64) -> Result<Box<MetaBlock>> {
        read_block(&*self.dev, b)
    }

    /// The node at `b`, which must be a node of a tree whose leaves hold values of
    /// `leaf_value_size` bytes.
    pub fn read_node(&self, b: u64, leaf_value_size: usize) -> Result<Arc<Node>> {
        let cached = match self.dirty.get(&b).or_else(|| self.committing.get(&b)) {
            Some(n) => Some(n.clone()),
            // The guard must end here, before the miss path locks the cache again.
            None => self.shard(b).lock().get(b),
        };
        let node = if let Some(n) = cached {
            n
        } else {
            if b == SUPERBLOCK_LOCATION || b >= self.meta_sm.nr_blocks() {
                return Err(Error::corrupt(
                    b,
                    format!(
                        "btree pointer to block {b} is outside the node area (1..{})",
                        self.meta_sm.nr_blocks()
                    ),
                ));
            }
            let raw = self.read_raw(b)?;
            let n = Arc::new(Node::decode(&raw, b, leaf_value_size)?);
            self.shard(b).lock().insert(b, n.clone());
            n
        };
        let expected = match node.kind {
            NodeKind::Internal => 8,
            NodeKind::Leaf => leaf_value_size,
        };
        if node.value_size != expected {
            return Err(Error::corrupt(
                b,
                format!(
                    "node holds {}-byte values where {expected} were expected",
                    node.value_size
                ),
            ));
        }
        Ok(node)
    }

    /// A dirty node, for reading.
    pub fn dirty_node(&self, b: u64) -> &Node {
        self.dirty
            .get(&b)
            .expect("node was shadowed in this transaction")
    }

    /// A dirty node, for writing.
    pub fn node_mut(&mut self, b: u64) -> &mut Node {
        Arc::make_mut(
            self.dirty
                .get_mut(&b)
                .expect("node was shadowed in this transaction"),
        )
    }

    /// Allocates a metadata block. Outside a commit the reserve stays untouched.
    pub fn alloc_meta(&mut self) -> Result<u64> {
        if !self.in_commit && self.meta_sm.nr_free() <= self.meta_reserve {
            return Err(Error::NoSpace(Space::Metadata));
        }
        self.meta_sm.alloc().ok_or(Error::NoSpace(Space::Metadata))
    }

    /// Allocates a block for `node` and makes it dirty.
    pub fn new_node(&mut self, node: Node) -> Result<u64> {
        let b = self.alloc_meta()?;
        self.dirty.insert(b, Arc::new(node));
        Ok(b)
    }

    /// Drops a reference to metadata block `b`; a block left unreferenced is forgotten.
    pub fn dec_meta(&mut self, b: u64) -> Result<u32> {
        let left = self.meta_sm.dec(b)?;
        if left == 0 {
            self.dirty.remove(&b);
            self.shard(b).lock().map.remove(&b);
        }
        Ok(left)
    }

    /// Moves nodes of a finished commit into the clean cache, except those the next
    /// transaction has freed meanwhile (their blocks stay blocked until it commits, so a
    /// freed node cannot have been reallocated yet).
    pub fn commit_finished(&mut self) {
        for (b, n) in std::mem::take(&mut self.committing) {
            if self.meta_sm.get(b) > 0 {
                self.shard(b).lock().insert(b, n);
            }
        }
    }
}

/// Reads raw block `b` of `dev`; an I/O error names the block.
pub(crate) fn read_block(dev: &dyn MetaDevice, b: u64) -> Result<Box<MetaBlock>> {
    let mut buf = crate::format::zeroed_block();
    dev.read_block(b, &mut buf).map_err(|source| Error::Io {
        op: "read",
        block: b,
        source,
    })?;
    Ok(buf)
}
