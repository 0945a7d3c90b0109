//! dm-thin v2 metadata: the on-disk format of Linux's dm-thin-pool, bit for bit, with a
//! copy-on-write btree, space maps with reference counts, and crash-safe transactions.
//!
//! Start at [`ThinMetadata`]. The format is described in docs/format.md, the commit protocol
//! in docs/crash-model.md.
#![forbid(unsafe_code)]

mod btree;
pub mod check;
mod commit;
pub mod error;
pub mod format;
mod open;
mod space_map;
mod store;
mod thin;
mod types;
pub mod xml;

#[cfg(test)]
pub(crate) mod test_util;

pub use error::{Error, Result, Space};
pub use format::DeviceDetails;
pub use thin::{FormatOptions, PoolStatus, ThinMetadata, MIN_METADATA_BLOCKS};
pub use types::{DataBlock, Lookup, ThinId, VBlock, MAX_THIN_ID};
