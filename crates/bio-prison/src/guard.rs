//! Guards: a held lock, released when dropped.
//!
//! Invariants:
//! - Each guard owns exactly one hold on one key (`Held`), in a slot or a cell, in the mode its
//!   type says, or one fence; dropping it gives that back and wakes whoever it held back. A
//!   hold moves from a slot to its key's cell (`Core::adopt`) when the core must decide a
//!   change of mode, and never back.
//! - Methods that change the mode consume the guard and hand the hold on (`forget` disarms the
//!   old guard's drop), so a hold is never released twice or leaked.

use std::fmt;
use std::mem;

use crate::core::{CellId, Loc};
use crate::error::{Error, Result};
use crate::fence::FenceShared;
use crate::future::Convert;
use crate::key::{Access, Key, Level, Mode, ThinId};
use crate::slots::{Fast, Slot, SlotId};
use crate::sync::Arc;
use crate::Prison;

/// One hold on one key: where it is accounted and in which mode.
#[derive(Clone, Copy)]
pub(crate) struct Held<'a> {
    pub(crate) prison: &'a Prison,
    pub(crate) shard: u32,
    pub(crate) at: At<'a>,
    pub(crate) key: Key,
    pub(crate) mode: Mode,
}

/// Where a hold is accounted: a slot (with a reference to it, for the lock-free release), or
/// a cell.
#[derive(Clone, Copy, Debug)]
pub(crate) enum At<'a> {
    Slot(SlotId, &'a Slot),
    Cell(CellId),
}

impl<'a> Held<'a> {
    /// A hold granted at `loc` (as the core says it).
    pub(crate) fn new(prison: &'a Prison, shard: u32, loc: Loc, key: Key, mode: Mode) -> Self {
        let at = match loc {
            Loc::Slot(id) => At::Slot(id, prison.slots(shard).slot(id)),
            Loc::Cell(cell) => At::Cell(cell),
        };
        Held {
            prison,
            shard,
            at,
            key,
            mode,
        }
    }

    #[inline(always)]
    pub(crate) fn release(self) {
        match self.at {
            At::Slot(_, slot) => {
                if slot.release(self.mode) {
                    self.release_sealed();
                }
            }
            At::Cell(cell) => self.release_cell(cell),
        }
    }

    #[inline(never)]
    fn release_cell(self, cell: CellId) {
        self.prison
            .with_core(self.shard, |core| core.release(cell, self.mode));
    }

    #[inline(never)]
    fn release_sealed(self) {
        self.prison
            .with_core(self.shard, |core| core.release_sealed(self.key, self.mode));
    }

    /// The same hold, now in `mode`, after the core changed it.
    pub(crate) fn now(self, mode: Mode) -> Self {
        Held { mode, ..self }
    }

    /// The same hold, now accounted in `cell`.
    pub(crate) fn in_cell(self, cell: CellId) -> Self {
        Held {
            at: At::Cell(cell),
            ..self
        }
    }
}

impl fmt::Debug for Held<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} held {:?}", self.key, self.mode)
    }
}

/// A shared lock; see [`Prison::shared`].
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct SharedGuard<'a> {
    held: Held<'a>,
}

/// The upgradable lock; see [`Prison::upgradable`].
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct UpgradableGuard<'a> {
    held: Held<'a>,
}

/// An exclusive lock; see [`Prison::exclusive`].
#[derive(Debug)]
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ExclusiveGuard<'a> {
    held: Held<'a>,
}

impl<'a> SharedGuard<'a> {
    #[inline]
    pub(crate) fn from_held(held: Held<'a>) -> Self {
        debug_assert!(matches!(held.mode, Mode::Shared(_)));
        SharedGuard { held }
    }

    /// The locked key.
    pub fn key(&self) -> Key {
        self.held.key
    }

    /// What this holder does to the block.
    pub fn access(&self) -> Access {
        match self.held.mode {
            Mode::Shared(access) => access,
            other => unreachable!("shared guard in mode {other:?}"),
        }
    }

    /// Becomes the upgradable holder without waiting, or gives the shared guard back when
    /// another holder is already upgradable or exclusive, or a range or thin lock covering the
    /// key is waiting or held.
    pub fn try_upgradable(self) -> std::result::Result<UpgradableGuard<'a>, SharedGuard<'a>> {
        let held = self.held;
        let access = self.access();
        let (held, upgraded) = match held.at {
            At::Slot(id, slot) => match slot.try_upgradable(access) {
                Fast::Done => (held, true),
                Fast::NotNow => (held, false),
                Fast::Sealed => {
                    let (cell, upgraded) = held.prison.with_core(held.shard, |core| {
                        let cell = core.adopt(id, held.key, held.mode);
                        (cell, core.try_upgradable(cell, access))
                    });
                    (held.in_cell(cell), upgraded)
                }
            },
            At::Cell(cell) => (
                held,
                held.prison
                    .with_core(held.shard, |core| core.try_upgradable(cell, access)),
            ),
        };
        mem::forget(self);
        if upgraded {
            Ok(UpgradableGuard {
                held: held.now(Mode::Upgradable),
            })
        } else {
            Err(SharedGuard { held })
        }
    }

    /// Upgrades to exclusive at `level`: the seed's `withUpgradedLock`.
    ///
    /// The returned future completes once the other shared holders that `level` conflicts
    /// with have drained; meanwhile new ones are held back. If another holder is already
    /// upgrading (or a range or thin lock covers the key), this fails at once with
    /// [`Error::UpgradeRaced`] and releases the shared lock (waiting could deadlock with that
    /// holder, which waits for us to drain): take the lock again and redo the lookup.
    pub fn upgrade(self, level: Level) -> Result<Convert<'a>> {
        match self.try_upgradable() {
            Ok(upgradable) => Ok(upgradable.upgrade(level)),
            Err(shared) => Err(Error::UpgradeRaced { key: shared.key() }),
        }
    }
}

impl<'a> UpgradableGuard<'a> {
    #[inline]
    pub(crate) fn from_held(held: Held<'a>) -> Self {
        debug_assert_eq!(held.mode, Mode::Upgradable);
        UpgradableGuard { held }
    }

    /// The locked key.
    pub fn key(&self) -> Key {
        self.held.key
    }

    /// Becomes exclusive at `level` once the shared holders it conflicts with have drained;
    /// new ones are held back meanwhile. Never fails: no one else can be upgrading.
    pub fn upgrade(self, level: Level) -> Convert<'a> {
        let held = self.held;
        mem::forget(self);
        Convert::new(held, level)
    }

    /// Becomes a plain shared holder doing `access`, letting another request upgrade.
    pub fn downgrade(self, access: Access) -> SharedGuard<'a> {
        let held = self.held;
        mem::forget(self);
        downgrade(held, access)
    }
}

impl<'a> ExclusiveGuard<'a> {
    #[inline]
    pub(crate) fn from_held(held: Held<'a>) -> Self {
        debug_assert!(matches!(held.mode, Mode::Exclusive(_)));
        ExclusiveGuard { held }
    }

    /// The locked key.
    pub fn key(&self) -> Key {
        self.held.key
    }

    /// What this lock keeps out.
    pub fn level(&self) -> Level {
        match self.held.mode {
            Mode::Exclusive(level) => level,
            other => unreachable!("exclusive guard in mode {other:?}"),
        }
    }

    /// Raises the level to `level` (no-op if already at or above it), once the shared holders
    /// the new level conflicts with have drained: after copying a block under `Level::Write`,
    /// promote to `Level::ReadWrite` before changing the mapping readers follow.
    pub fn promote(self, level: Level) -> Convert<'a> {
        let held = self.held;
        let target = level.max(self.level());
        mem::forget(self);
        Convert::new(held, target)
    }

    /// Becomes a shared holder doing `access`: after the mapping is in place, the request's
    /// own I/O runs beside other requests'.
    pub fn downgrade(self, access: Access) -> SharedGuard<'a> {
        let held = self.held;
        mem::forget(self);
        downgrade(held, access)
    }
}

impl Drop for SharedGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.held.release();
    }
}

impl Drop for UpgradableGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.held.release();
    }
}

impl Drop for ExclusiveGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.held.release();
    }
}

/// An exclusive lock on a range of virtual blocks or a whole thin; see
/// [`Prison::exclusive_range`] and [`Prison::exclusive_thin`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct FenceGuard<'a> {
    pub(crate) prison: &'a Prison,
    /// `None` for an empty range, which registered nothing.
    pub(crate) registered: Option<(u64, Arc<FenceShared>)>,
    pub(crate) thin: ThinId,
    /// Inclusive block range, `None` when empty.
    pub(crate) blocks: Option<(u64, u64)>,
    pub(crate) level: Level,
}

impl FenceGuard<'_> {
    /// The thin whose blocks are locked.
    pub fn thin(&self) -> ThinId {
        self.thin
    }

    /// First and last locked block (`0` and `u64::MAX` for a whole thin); `None` if empty.
    pub fn blocks(&self) -> Option<(u64, u64)> {
        self.blocks
    }

    /// What this lock keeps out.
    pub fn level(&self) -> Level {
        self.level
    }
}

impl fmt::Debug for FenceGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceGuard")
            .field("thin", &self.thin)
            .field("blocks", &self.blocks)
            .field("level", &self.level)
            .finish()
    }
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registered.take() {
            self.prison.unregister_fence(id);
        }
    }
}

/// Turns an upgradable or exclusive hold into a shared one doing `access`; the one path both
/// guards' `downgrade` take.
fn downgrade(held: Held<'_>, access: Access) -> SharedGuard<'_> {
    let held = match held.at {
        At::Slot(id, slot) => match slot.try_downgrade(held.mode, access) {
            Fast::Done => held,
            Fast::NotNow | Fast::Sealed => {
                // Sealed: waiters may be let in, which is the core's to decide.
                let cell = held.prison.with_core(held.shard, |core| {
                    let cell = core.adopt(id, held.key, held.mode);
                    core.downgrade(cell, held.mode, access);
                    cell
                });
                held.in_cell(cell)
            }
        },
        At::Cell(cell) => {
            held.prison
                .with_core(held.shard, |core| core.downgrade(cell, held.mode, access));
            held
        }
    };
    SharedGuard {
        held: held.now(Mode::Shared(access)),
    }
}
