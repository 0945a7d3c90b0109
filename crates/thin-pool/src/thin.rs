//! Requests on one thin: the seed's remap logic (`../shared/seeds/004_*.txt`) as straight-line
//! async code, one task per request, with bio-prison locks held for the request's life.
//!
//! A request is split at data-block boundaries into parts; the parts of one request run
//! concurrently (each takes and releases its own virtual lock, so no part ever waits for a
//! lock while holding another part's: `docs/locking.md` rule 1).
//!
//! Crash safety rests on one ordering: **data before mapping**. A newly provisioned or
//! copied block gets its data written *before* the mapping that names it is inserted, while
//! the virtual block is locked exclusively. A commit captures only inserted mappings and
//! flushes the data device before writing the metadata, so a committed mapping never points
//! at data that is not durable, and never at a block holding another thin's old bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bio_prison::{Access, ExclusiveGuard, Key, Level};
use block_io::data::{rt, DataDevice, IoBuf};
use thin_metadata::{DataBlock, Lookup, Space, ThinId, VBlock};

use crate::config::NoSpacePolicy;
use crate::error::{PoolError, Result};
use crate::pool::{Shared, ThinShared};
use crate::reserve::RESERVE_THIN;
use crate::status::{bump, PoolMode};

/// A handle on one thin, for its requests. Cheap to share between a front end's queue
/// threads by reference; each thread passes its own data device. While a handle exists the
/// thin cannot be deleted.
#[derive(Debug)]
pub struct Thin {
    shared: Arc<Shared>,
    id: u32,
    ts: Arc<ThinShared>,
}

/// One block's share of a request.
#[derive(Debug, Clone, Copy)]
struct Part {
    vblock: u64,
    /// Byte offset inside the block.
    offset: u64,
    len: u64,
    /// Where the part's bytes are in the request's buffer.
    buf_off: usize,
}

impl Part {
    fn covers_block(&self, block_size: u64) -> bool {
        self.offset == 0 && self.len == block_size
    }
}

/// A block for a write to land in before its mapping is recorded.
#[derive(Debug, Clone, Copy)]
enum Fresh {
    /// Claimed from free space (free on disk until mapped); `zero` when the writer must
    /// zero it first.
    Claimed { block: DataBlock, zero: bool },
    /// Pre-zeroed, still mapped at `key` in the reserve thin until the move.
    Reserved { key: u64, block: DataBlock },
}

impl Fresh {
    fn block(&self) -> DataBlock {
        match *self {
            Fresh::Claimed { block, .. } | Fresh::Reserved { block, .. } => block,
        }
    }
}

/// A request's parts, without a heap allocation for the usual single part.
enum Parts {
    One([Part; 1]),
    Many(Vec<Part>),
}

impl std::ops::Deref for Parts {
    type Target = [Part];

    fn deref(&self) -> &[Part] {
        match self {
            Parts::One(one) => one,
            Parts::Many(many) => many,
        }
    }
}

/// Counts a request as in flight for its lifetime.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn new(s: &'a Shared) -> Self {
        s.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bd(b: DataBlock) -> block_io::data::DataBlock {
    block_io::data::DataBlock(b.0)
}

/// True when every byte is zero (chunked so that it vectorizes and still stops early).
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(512)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl Thin {
    pub(crate) fn new(shared: Arc<Shared>, id: u32, ts: Arc<ThinShared>) -> Thin {
        Thin { shared, id, ts }
    }

    /// The thin's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The pool's data block size in bytes.
    pub fn block_size_bytes(&self) -> u64 {
        self.shared.geometry.block_size_bytes
    }

    /// Offsets and lengths of requests must be multiples of this.
    pub fn align_bytes(&self) -> u64 {
        self.shared.geometry.align_bytes
    }

    fn split(&self, offset: u64, len: u64) -> Result<Parts> {
        let align = self.align_bytes();
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(PoolError::Invalid(format!(
                "request at byte {offset} of {len} bytes is not aligned to {align} bytes"
            )));
        }
        let end = offset.checked_add(len).ok_or_else(|| {
            PoolError::Invalid(format!("request at byte {offset} of {len} bytes overflows"))
        })?;
        let bs = self.block_size_bytes();
        if len > 0 && offset / bs == (end - 1) / bs {
            // The common case, a request inside one block: no allocation.
            return Ok(Parts::One([Part {
                vblock: offset / bs,
                offset: offset % bs,
                len,
                buf_off: 0,
            }]));
        }
        let mut parts = Vec::with_capacity((len / bs + 2) as usize);
        let mut pos = offset;
        while pos < end {
            let vblock = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            parts.push(Part {
                vblock,
                offset: in_block,
                len: n,
                buf_off: (pos - offset) as usize,
            });
            pos += n;
        }
        Ok(Parts::Many(parts))
    }

    /// Reads `buf.len()` bytes at byte `offset` of the thin. Unprovisioned blocks read as
    /// zeros.
    pub async fn read<D: DataDevice>(
        &self,
        dev: &D,
        offset: u64,
        mut buf: IoBuf,
    ) -> (Result<()>, IoBuf) {
        let _in = InFlight::new(&self.shared);
        bump(&self.shared.counters.reads);
        bump(&self.ts.counters.reads);
        let parts = match self
            .split(offset, buf.len() as u64)
            .and_then(|p| self.shared.check_readable().map(|()| p))
        {
            Ok(p) => p,
            Err(e) => return (Err(e), buf),
        };
        if let [part] = &*parts {
            return self.read_part(dev, part, buf).await;
        }
        let outs = rt::join_all(
            parts
                .iter()
                .map(|p| self.read_part(dev, p, IoBuf::new(p.len as usize))),
        )
        .await;
        let mut res = Ok(());
        for (p, (r, b)) in parts.iter().zip(outs) {
            match r {
                Ok(()) => buf[p.buf_off..p.buf_off + b.len()].copy_from_slice(&b),
                Err(e) => {
                    if res.is_ok() {
                        res = Err(e);
                    }
                }
            }
        }
        (res, buf)
    }

    /// remapRead: shared lock, lookup, zeros or the data block.
    async fn read_part<D: DataDevice>(
        &self,
        dev: &D,
        p: &Part,
        mut buf: IoBuf,
    ) -> (Result<()>, IoBuf) {
        let s = &*self.shared;
        let _lock = s
            .prison
            .shared(Key::virt(self.id, p.vblock), Access::Read)
            .await;
        match s.meta.lookup_data_block(ThinId(self.id), VBlock(p.vblock)) {
            Ok(None) => {
                buf.fill(0);
                (Ok(()), buf)
            }
            Ok(Some(data_block)) => {
                let (r, buf) = dev.read(bd(data_block), p.offset, buf).await;
                (r.map_err(PoolError::DataIo), buf)
            }
            Err(e) => (Err(s.meta_error(e)), buf),
        }
    }

    /// Writes `buf` at byte `offset`; with `fua` the write is durable when this returns.
    pub async fn write<D: DataDevice>(
        &self,
        dev: &D,
        offset: u64,
        mut buf: IoBuf,
        fua: bool,
    ) -> (Result<()>, IoBuf) {
        let _in = InFlight::new(&self.shared);
        bump(&self.shared.counters.writes);
        bump(&self.ts.counters.writes);
        let parts = match self
            .split(offset, buf.len() as u64)
            .and_then(|p| self.shared.check_writable().map(|()| p))
        {
            Ok(p) => p,
            Err(e) => return (Err(e), buf),
        };
        let mut res = if let [part] = &*parts {
            let (r, b) = self.write_part(dev, part, buf).await;
            buf = b;
            r
        } else {
            let outs = rt::join_all(parts.iter().map(|p| {
                let chunk = IoBuf::from_slice(&buf[p.buf_off..p.buf_off + p.len as usize]);
                self.write_part(dev, p, chunk)
            }))
            .await;
            outs.into_iter()
                .map(|(r, _)| r)
                .find(|r| r.is_err())
                .unwrap_or(Ok(()))
        };
        if res.is_ok() && fua {
            res = self.make_durable(dev).await;
        }
        (res, buf)
    }

    /// remapWrite for one block.
    async fn write_part<D: DataDevice>(
        &self,
        dev: &D,
        p: &Part,
        buf: IoBuf,
    ) -> (Result<()>, IoBuf) {
        let s = &*self.shared;
        let (thin, vblock) = (ThinId(self.id), VBlock(p.vblock));
        loop {
            if let Err(e) = s.check_writable() {
                return (Err(e), buf);
            }
            let lock = s
                .prison
                .shared(Key::virt(self.id, p.vblock), Access::Write)
                .await;
            let found = match s.lookup_for_write(thin, vblock) {
                Ok(l) => l,
                Err(e) => return (Err(s.meta_error(e)), buf),
            };
            match found {
                Lookup::Provisioned {
                    data_block,
                    shared: false,
                } => {
                    let (r, buf) = dev.write(bd(data_block), p.offset, buf).await;
                    return (r.map_err(PoolError::DataIo), buf);
                }
                Lookup::Unprovisioned => {
                    // Unprovisioned blocks read as zeros: writing zeros changes nothing.
                    if is_zero(&buf) {
                        bump(&s.counters.zero_writes_elided);
                        return (Ok(()), buf);
                    }
                    let Ok(upgrade) = lock.upgrade(Level::ReadWrite) else {
                        bump(&s.counters.upgrade_races);
                        continue;
                    };
                    let ex = upgrade.await;
                    return self.provision(dev, p, buf, ex).await;
                }
                Lookup::Provisioned {
                    data_block,
                    shared: true,
                } => {
                    // Level::Write: writers drained, readers of the old block go on.
                    let Ok(upgrade) = lock.upgrade(Level::Write) else {
                        bump(&s.counters.upgrade_races);
                        continue;
                    };
                    let ex = upgrade.await;
                    return self.break_sharing(dev, p, buf, data_block, ex).await;
                }
            }
        }
    }

    /// provision: a new block (pre-zeroed unless the write covers it), data, then mapping.
    async fn provision<D: DataDevice>(
        &self,
        dev: &D,
        p: &Part,
        buf: IoBuf,
        _exclusive: ExclusiveGuard<'_>,
    ) -> (Result<()>, IoBuf) {
        let s = &*self.shared;
        let full = p.covers_block(self.block_size_bytes());
        let fresh = match s.allocate(!full).await {
            Ok(x) => x,
            Err(e) => return (Err(e), buf),
        };
        let block = fresh.block();
        let _data = s
            .prison
            .exclusive(Key::data(block.0), Level::ReadWrite)
            .await;
        if let Fresh::Claimed { zero: true, .. } = fresh {
            if let Err(e) = dev.zero_blocks(bd(block), 1).await {
                s.give_back(fresh);
                return (Err(PoolError::DataIo(e)), buf);
            }
        }
        let (r, buf) = dev.write(bd(block), p.offset, buf).await;
        if let Err(e) = r {
            s.give_back(fresh);
            return (Err(PoolError::DataIo(e)), buf);
        }
        if let Err(e) = s.map_fresh(fresh, ThinId(self.id), VBlock(p.vblock)) {
            s.give_back(fresh);
            return (Err(s.meta_error(e)), buf);
        }
        s.thin_changed_fast(self.id, &self.ts);
        bump(&self.ts.counters.provisions);
        (Ok(()), buf)
    }

    /// breakSharing: copy (unless the write covers the block) and write into a new block
    /// while readers go on with the old one, then drain them and switch the mapping. The
    /// write rides on the copy where the block fits a buffer (`bufs.rs`).
    async fn break_sharing<D: DataDevice>(
        &self,
        dev: &D,
        p: &Part,
        buf: IoBuf,
        old: DataBlock,
        exclusive: ExclusiveGuard<'_>,
    ) -> (Result<()>, IoBuf) {
        let s = &*self.shared;
        let full = p.covers_block(self.block_size_bytes());
        // The copy overwrites the whole block, so it need not be zeroed.
        let fresh = match s.allocate(false).await {
            Ok(f) => f,
            Err(e) => return (Err(e), buf),
        };
        let new = fresh.block();
        let (lo, hi) = (old.0.min(new.0), old.0.max(new.0));
        let _lo = s.prison.exclusive(Key::data(lo), Level::ReadWrite).await;
        let _hi = s.prison.exclusive(Key::data(hi), Level::ReadWrite).await;
        let (r, buf) = if full {
            bump(&s.counters.breaks_full);
            dev.write(bd(new), p.offset, buf).await
        } else {
            let (r, buf) = match s.copy_bufs.take() {
                Some(block_buf) => (
                    copy_with_write(s, dev, old, new, p, &buf, block_buf).await,
                    buf,
                ),
                None => match dev.copy_block(bd(old), bd(new)).await {
                    Ok(()) => dev.write(bd(new), p.offset, buf).await,
                    Err(e) => (Err(e), buf),
                },
            };
            if r.is_ok() {
                bump(&s.counters.copies);
                bump(&self.ts.counters.copies);
            }
            (r, buf)
        };
        if let Err(e) = r {
            s.give_back(fresh);
            return (Err(PoolError::DataIo(e)), buf);
        }
        // Readers of the old block drain; new ones wait for the new mapping.
        let _exclusive = exclusive.promote(Level::ReadWrite).await;
        // The old block loses this thin's reference: the other sharers may see it unshared.
        let _cut = Cut::begin(s);
        if let Err(e) = s.map_fresh(fresh, ThinId(self.id), VBlock(p.vblock)) {
            s.give_back(fresh);
            return (Err(s.meta_error(e)), buf);
        }
        s.thin_changed_fast(self.id, &self.ts);
        (Ok(()), buf)
    }

    /// Discards `[offset, offset + len)`: whole blocks are unmapped (and passed down to the
    /// data device when their last reference goes); partial blocks at either end are left
    /// alone, as dm-thin does.
    pub async fn discard<D: DataDevice>(&self, dev: &D, offset: u64, len: u64) -> Result<()> {
        let _in = InFlight::new(&self.shared);
        bump(&self.shared.counters.discards);
        let parts = self.split(offset, len)?;
        self.shared.check_writable()?;
        match whole_blocks(&parts, self.block_size_bytes()) {
            Some((first, end)) => {
                self.unmap(dev, first, end, self.shared.cfg.discard_passdown)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros: whole blocks are unmapped, partial ones
    /// written with zeros (nothing is allocated for unprovisioned ones).
    pub async fn write_zeroes<D: DataDevice>(&self, dev: &D, offset: u64, len: u64) -> Result<()> {
        let _in = InFlight::new(&self.shared);
        bump(&self.shared.counters.writes);
        let parts = self.split(offset, len)?;
        self.shared.check_writable()?;
        let bs = self.block_size_bytes();
        if let Some((first, end)) = whole_blocks(&parts, bs) {
            self.unmap(dev, first, end, self.shared.cfg.discard_passdown)
                .await?;
        }
        for p in parts.iter().filter(|p| !p.covers_block(bs)) {
            let (r, _) = self.write_part(dev, p, IoBuf::new(p.len as usize)).await;
            r?;
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset + len)` without deallocating anything (a
    /// write-zeroes with NOUNMAP / NO_HOLE): provisioned blocks are overwritten, and
    /// unprovisioned ones, which already read as zeros, stay unprovisioned (a zero write
    /// allocates nothing). `buf` is scratch space, at least one alignment unit; it comes back.
    pub async fn write_zeroes_keeping_blocks<D: DataDevice>(
        &self,
        dev: &D,
        offset: u64,
        len: u64,
        mut buf: IoBuf,
    ) -> (Result<()>, IoBuf) {
        let align = self.align_bytes().max(1);
        let cap = buf.capacity() as u64;
        if cap < align {
            buf = IoBuf::new(align as usize);
        }
        let cap = (cap - cap % align).max(align);
        let (mut pos, end) = (offset, offset.saturating_add(len));
        while pos < end {
            let n = (end - pos).min(cap);
            buf.set_len(n as usize);
            buf.fill(0);
            let (r, b) = self.write(dev, pos, buf, false).await;
            buf = b;
            if let Err(e) = r {
                return (Err(e), buf);
            }
            pos += n;
        }
        (Ok(()), buf)
    }

    /// Unmaps every mapped block in `[first, end)`, in bounded batches under a range lock,
    /// yielding between batches so that however large the range, other I/O goes on.
    async fn unmap<D: DataDevice>(
        &self,
        dev: &D,
        first: u64,
        end: u64,
        passdown: bool,
    ) -> Result<()> {
        let s = &*self.shared;
        let thin = ThinId(self.id);
        let batch = s.cfg.discard_batch_blocks as usize;
        let mut cur = first;
        while cur < end {
            s.check_writable()?;
            let found = s
                .meta
                .mappings_in(thin, VBlock(cur), VBlock(end), batch)
                .map_err(|e| s.meta_error(e))?;
            let (Some(lo), Some(hi)) = (found.first(), found.last()) else {
                break;
            };
            let (lo, hi) = (lo.0 .0, hi.0 .0 + 1);
            let _range = s
                .prison
                .exclusive_range(
                    bio_prison::ThinId(self.id),
                    bio_prison::VBlock(lo)..bio_prison::VBlock(hi),
                    Level::ReadWrite,
                )
                .await;
            // Look again under the lock: writes may have provisioned more meanwhile. Each
            // block's mapping time is noted for the passdown decision below.
            let mut found = Vec::new();
            s.meta
                .for_each_mapping(thin, VBlock(lo), |v, d, time| {
                    if v.0 >= hi {
                        return false;
                    }
                    found.push((d.0, time));
                    true
                })
                .map_err(|e| s.meta_error(e))?;
            let mut blocks: Vec<u64> = found.iter().map(|&(d, _)| d).collect();
            blocks.sort_unstable();
            blocks.dedup();
            // A block shared in the last committed state (see `Shared::lookup_for_write`)
            // keeps its data even when its last reference goes now: a crash brings the sharer
            // back. Which blocks may be is decided before the removal, by mapping age: for a
            // block whose last reference this removal drops, the other parts of the write
            // test (a shared path, a count above one) cannot hold, since the removal would
            // then leave it referenced.
            let cut = Cut::begin(s);
            let mut keep: Vec<u64> = Vec::new();
            if passdown {
                let snapshotted = s
                    .meta
                    .details(thin)
                    .map_err(|e| s.meta_error(e))?
                    .snapshotted_time;
                keep = found
                    .iter()
                    .filter(|&&(_, time)| time < snapshotted)
                    .map(|&(d, _)| d)
                    .collect();
                keep.sort_unstable();
            }
            // Data locks keep a block whose last reference goes from being reallocated and
            // written (after the next commit) before its passdown is done.
            let mut data_locks = Vec::with_capacity(blocks.len());
            for &b in &blocks {
                data_locks.push(s.prison.exclusive(Key::data(b), Level::ReadWrite).await);
            }
            let removed = s.meta.remove_range(thin, VBlock(lo), VBlock(hi));
            // Even a partial removal (metadata space ran low half way) changed the thin.
            s.thin_changed_fast(self.id, &self.ts);
            let n = removed.map_err(|e| s.meta_error(e))?;
            s.counters.blocks_discarded.fetch_add(n, Ordering::Relaxed);
            self.ts
                .counters
                .blocks_discarded
                .fetch_add(n, Ordering::Relaxed);
            if passdown {
                // With no other cut of sharing pending, the last commit shows exactly today's
                // sharing (less this discard's own removal), and the age test is not needed.
                let settled = s.sharing_settled(1);
                let freed: Vec<u64> = blocks
                    .into_iter()
                    .filter(|&b| s.meta.data_block_count(DataBlock(b)) == 0)
                    .filter(|b| settled || keep.binary_search(b).is_err())
                    .collect();
                pass_down(s, dev, &freed).await;
            }
            drop(cut);
            drop(data_locks);
            cur = hi;
            rt::yield_now().await;
        }
        Ok(())
    }

    /// Makes every write acknowledged so far durable.
    pub async fn flush<D: DataDevice>(&self, dev: &D) -> Result<()> {
        let _in = InFlight::new(&self.shared);
        bump(&self.shared.counters.flushes);
        self.make_durable(dev).await
    }

    /// A commit if this thin's mappings changed since the last one, else a data flush.
    async fn make_durable<D: DataDevice>(&self, dev: &D) -> Result<()> {
        let s = &*self.shared;
        if self.ts.last_change.load(Ordering::SeqCst) > s.durable_seq.load(Ordering::SeqCst) {
            s.commit_and_wait().await
        } else {
            s.check_readable()?;
            dev.flush().await.map_err(PoolError::DataIo)
        }
    }
}

/// Copies data block `old` to `new` with the write `p` (bytes `data`) laid over the copy: one
/// read and one write of the whole block through `block_buf`, which is kept for reuse after.
/// (The copy's write and the request's would be two writes to the same block.)
async fn copy_with_write<D: DataDevice>(
    s: &Shared,
    dev: &D,
    old: DataBlock,
    new: DataBlock,
    p: &Part,
    data: &[u8],
    block_buf: IoBuf,
) -> std::io::Result<()> {
    let (r, mut block_buf) = dev.read(bd(old), 0, block_buf).await;
    let r = match r {
        Ok(()) => {
            let at = p.offset as usize;
            block_buf[at..at + data.len()].copy_from_slice(data);
            let (r, b) = dev.write(bd(new), 0, block_buf).await;
            block_buf = b;
            r
        }
        Err(e) => Err(e),
    };
    s.copy_bufs.put(block_buf);
    r
}

/// The virtual blocks `[first, end)` that `parts` cover whole (they are contiguous: only
/// the first and last part of a request can be partial), if any.
fn whole_blocks(parts: &[Part], block_size: u64) -> Option<(u64, u64)> {
    let mut whole = parts.iter().filter(|p| p.covers_block(block_size));
    let first = whole.next()?;
    let last = whole.next_back().unwrap_or(first);
    Some((first.vblock, last.vblock + 1))
}

/// The runs of consecutive numbers in ascending `blocks`, as (first, count).
pub(crate) fn runs(blocks: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *blocks.get(i)?;
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
            j += 1;
        }
        let n = (j - i) as u64;
        i = j;
        Some((first, n))
    })
}

/// Passes discards of `blocks` (ascending) down to the data device in runs. A discard is a
/// hint: a failure is logged, not returned.
async fn pass_down<D: DataDevice>(s: &Shared, dev: &D, blocks: &[u64]) {
    for (first, n) in runs(blocks) {
        match dev
            .discard_blocks(block_io::data::DataBlock(first), n)
            .await
        {
            Ok(_) => {
                s.counters
                    .blocks_passed_down
                    .fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("discard passdown of {n} blocks failed: {e}"),
        }
    }
}

impl Drop for Thin {
    fn drop(&mut self) {
        let mut thins = self.shared.thins.lock();
        if let Some(e) = thins.get_mut(&self.id) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// A change that may end the sharing of data blocks (a break, an unmap, a delete), pending
/// from `begin` until dropped after the change. Until a commit that started after the drop
/// has finished, the last commit may show blocks shared that look unshared now.
pub(crate) struct Cut<'a>(&'a Shared);

impl<'a> Cut<'a> {
    pub fn begin(s: &'a Shared) -> Cut<'a> {
        s.cuts_in_progress.fetch_add(1, Ordering::SeqCst);
        Cut(s)
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        self.0.cut_seq.fetch_add(1, Ordering::SeqCst);
        self.0.cuts_in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// True when no cut of sharing is pending or uncommitted (ignoring `own` cuts of the
    /// caller's in progress): then the last commit shows no sharing that is gone now.
    pub fn sharing_settled(&self, own: u64) -> bool {
        self.cuts_in_progress.load(Ordering::SeqCst) <= own
            && self.cut_seq.load(Ordering::SeqCst) <= self.cut_durable.load(Ordering::SeqCst)
    }

    /// Looks a block up for a writer. `shared` is exact for today and, while a cut of sharing
    /// is not yet durable, also true for mappings older than the thin's latest snapshot
    /// (dm-thin's test): such a block may be shared in the last commit, and an in-place
    /// write would show through the other thin after a crash. Once the cuts are committed
    /// the exact answer alone decides, so writes after a deleted snapshot do not copy.
    fn lookup_for_write(&self, thin: ThinId, vblock: VBlock) -> thin_metadata::Result<Lookup> {
        let found = self.meta.lookup(thin, vblock)?;
        // Checked after the lookup: a cut the lookup saw is pending or counted by now.
        if matches!(found, Lookup::Provisioned { shared: false, .. }) && !self.sharing_settled(0) {
            return self.meta.lookup_for_write(thin, vblock);
        }
        Ok(found)
    }

    /// `thin_changed` for a handle that already has the thin's shared state.
    pub(crate) fn thin_changed_fast(&self, thin: u32, ts: &ThinShared) {
        let seq = self.change_seq.fetch_add(1, Ordering::SeqCst) + 1;
        ts.last_change.fetch_max(seq, Ordering::SeqCst);
        if let Some(log) = &self.cfg.change_log {
            log.changed(thin, seq);
        }
    }

    /// Records the mapping of a fresh block after its data was written.
    fn map_fresh(&self, fresh: Fresh, thin: ThinId, vblock: VBlock) -> thin_metadata::Result<()> {
        match fresh {
            Fresh::Claimed { block, .. } => self.meta.insert(thin, vblock, block),
            Fresh::Reserved { key, block } => {
                self.meta
                    .move_mapping(RESERVE_THIN, VBlock(key), thin, vblock, block)
            }
        }
    }

    /// Gives back a fresh block that was not mapped.
    fn give_back(&self, fresh: Fresh) {
        match fresh {
            // Fails only when the pool latched read-only meanwhile, which dropped the whole
            // transaction (and this claim with it).
            Fresh::Claimed { block, .. } => drop(self.meta.release_data_block(block)),
            // It may hold part of a write now: zero it again before reuse.
            Fresh::Reserved { key, block } => {
                self.reserve.dirty(key, block);
                self.kick_worker();
            }
        }
    }

    /// Finds a block for a write to land in. With `want_zeroed`, a pre-zeroed one from the
    /// reserve if any, else a claimed one the caller must zero. When no block is free, waits
    /// for space or fails, as `NoSpacePolicy` says.
    async fn allocate(&self, want_zeroed: bool) -> Result<Fresh> {
        let deadline = match self.cfg.no_space {
            NoSpacePolicy::Queue { timeout } => Some(Instant::now() + timeout),
            NoSpacePolicy::Error => None,
        };
        let mut waited = false;
        let mut committed = false;
        loop {
            self.check_writable()?;
            if want_zeroed {
                if let Some(f) = self.take_reserved() {
                    return Ok(f);
                }
            }
            let gen = self.space_gen.load(Ordering::SeqCst);
            match self.meta.claim_data_block() {
                Ok(b) => {
                    if self.mode() == PoolMode::OutOfDataSpace {
                        self.set_mode(PoolMode::Write, "data space available again".into());
                    }
                    self.check_low_water();
                    let c = &self.counters;
                    bump(if want_zeroed {
                        &c.provisions_sync_zero
                    } else {
                        &c.provisions_full
                    });
                    if self.reserve.nr_held() < self.cfg.reserve_blocks {
                        self.kick_worker();
                    }
                    return Ok(Fresh::Claimed {
                        block: b,
                        zero: want_zeroed,
                    });
                }
                Err(thin_metadata::Error::NoSpace(Space::Data)) => {}
                Err(e) => return Err(self.meta_error(e)),
            }
            // Out of plain space: a zeroed block will do for anyone.
            if !want_zeroed {
                if let Some(f) = self.take_reserved() {
                    return Ok(f);
                }
            }
            // Blocks freed in this transaction can be allocated once it is committed.
            if !committed && self.meta.status().nr_free_data_blocks > 0 {
                committed = true;
                self.commit_and_wait().await?;
                continue;
            }
            if self.mode() == PoolMode::Write {
                self.set_mode(PoolMode::OutOfDataSpace, "no free data blocks".into());
            }
            let Some(deadline) = deadline else {
                bump(&self.counters.no_space_errors);
                return Err(PoolError::NoDataSpace);
            };
            if Instant::now() >= deadline {
                bump(&self.counters.no_space_errors);
                return Err(PoolError::NoDataSpace);
            }
            if !waited {
                waited = true;
                bump(&self.counters.no_space_waits);
            }
            // The committer wakes waiters periodically so the deadline is noticed.
            self.space
                .wait_until(|| {
                    self.space_gen.load(Ordering::SeqCst) != gen || Instant::now() >= deadline
                })
                .await;
            committed = false;
        }
    }

    fn take_reserved(&self) -> Option<Fresh> {
        let (key, block) = self.reserve.take()?;
        bump(&self.counters.provisions_reserve);
        // The worker refills below half the target while busy (and fully once idle, on its
        // own timer): waking it on every take would cost a syscall per first write.
        if self.reserve.nr_held() < self.cfg.reserve_blocks.div_ceil(2) {
            self.kick_worker();
        }
        Some(Fresh::Reserved { key, block })
    }
}

#[cfg(test)]
mod tests {
    use super::{is_zero, runs};

    #[test]
    fn runs_of_consecutive_blocks() {
        let got: Vec<_> = runs(&[1, 2, 3, 5, 7, 8]).collect();
        assert_eq!(got, vec![(1, 3), (5, 1), (7, 2)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut v = vec![0u8; 4096];
        v[4095] = 1;
        assert!(!is_zero(&v));
        v[4095] = 0;
        v[0] = 0x80;
        assert!(!is_zero(&v));
    }
}
