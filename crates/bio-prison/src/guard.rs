//! Guards: a held lock, released when dropped.
//!
//! Invariants:
//! - Each guard owns exactly one hold on one cell (`Held`) in the mode its type says, or one
//!   fence; dropping it gives that back and wakes whoever it held back.
//! - Methods that change the mode consume the guard and hand the hold on (`forget` disarms the
//!   old guard's drop), so a hold is never released twice or leaked.

use std::fmt;
use std::mem;

use crate::core::CellId;
use crate::error::{Error, Result};
use crate::fence::FenceShared;
use crate::future::Convert;
use crate::key::{Access, Key, Level, Mode, ThinId};
use crate::sync::Arc;
use crate::Prison;

/// One hold on one cell: where it is and in which mode.
#[derive(Clone, Copy)]
pub(crate) struct Held<'a> {
    pub(crate) prison: &'a Prison,
    pub(crate) shard: u32,
    pub(crate) cell: CellId,
    pub(crate) key: Key,
    pub(crate) mode: Mode,
}

impl Held<'_> {
    #[inline]
    fn release(self) {
        self.prison
            .with_core(self.shard, |core| core.release(self.cell, self.mode));
    }

    /// The same hold, now in `mode`, after the core changed it.
    pub(crate) fn now(self, mode: Mode) -> Self {
        Held { mode, ..self }
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
        if held
            .prison
            .with_core(held.shard, |core| core.try_upgradable(held.cell, access))
        {
            mem::forget(self);
            Ok(UpgradableGuard {
                held: held.now(Mode::Upgradable),
            })
        } else {
            Err(self)
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
    #[inline]
    fn drop(&mut self) {
        self.held.release();
    }
}

impl Drop for UpgradableGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.held.release();
    }
}

impl Drop for ExclusiveGuard<'_> {
    #[inline]
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
    held.prison.with_core(held.shard, |core| {
        core.downgrade(held.cell, held.mode, access)
    });
    SharedGuard {
        held: held.now(Mode::Shared(access)),
    }
}
