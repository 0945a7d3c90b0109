//! The async runtime pieces block-io needs and nothing more: the ring abstraction the io_uring
//! engine submits on (`RingSubmitter`), block-io's own per-thread ring (`StandaloneRing`), and
//! a tiny executor that drives it (`block_on`, `join_all`, `sleep`).
//!
//! Inside a ublk queue thread none of the executor is used: ublk-target implements
//! `RingSubmitter` on the queue's ring and libublk's executor runs the futures.

mod executor;
mod reactor;
mod ring;

pub use executor::{block_on, join_all, sleep, yield_now, JoinAll, Sleep};
pub use reactor::{RingConfig, RingStats, StandaloneOp, StandaloneRing};
pub(crate) use ring::submit;
pub use ring::{FileTarget, OrphanList, RingSubmitter};
