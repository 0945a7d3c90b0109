//! A naive reference model of dm-thin metadata and a seeded random workload that drives
//! `ThinMetadata` and the model in lockstep, comparing every answer.
//!
//! Shared by the model and corruption tests here and, through a `#[path]` include, by the
//! oracle and crash tests of the `tests` package, so that every test checks against the
//! same model.
//!
//! The model never looks at trees or reference counts. Each thin is a map of virtual block
//! -> (data block, time). A data block is in use while a thin, the held metadata snapshot
//! or an allocation not yet inserted names it, and shared while more than one of those
//! does. Data block identity stands in for data contents: the model records which block the
//! metadata handed out, so a wrong `shared` flag (which would let the pool overwrite a block
//! another thin still reads) shows up as a mismatch at the lookup itself.
//!
//! What must NOT happen, and is asserted on every operation:
//! - a lookup, walk or `details` that differs from the model;
//! - a `shared` flag that is not exact, in either direction;
//! - an allocation of a block that is in use, or that the last committed state still names
//!   (a crash would then find the committed mapping pointing at overwritten data);
//! - `NoSpace(Data)` while an allocatable block exists, or success when none does;
//! - free counts, transaction id or time that differ from the model;
//! - `abort` or a reopen that yields anything but the last committed state;
//! - at every reopen, `thin_metadata::check` finding a problem in the committed metadata, or
//!   counting thins, data blocks in use or the transaction id differently.

pub mod blocks;
mod state;
mod workload;

// Not every test binary uses every item.
#[allow(unused_imports)]
pub use state::{compare_state, compare_thin, Held, Mapping, Model, State, Thin};
#[allow(unused_imports)]
pub use workload::{Config, Stats, Workload};
