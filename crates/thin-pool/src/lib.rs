//! The ublk-thin remap engine: thin volumes and snapshots served from a dm-thin pool.
//!
//! Every request runs as its own async task and follows seed 004's pseudocode: a shared lock
//! on (thin, virtual block) for the request's life, a metadata lookup, then a read, an
//! overwrite, a provision or a break of sharing, upgrading to exclusive when the mapping must
//! change, with exclusive locks on data blocks against discards. See `thin.rs` for the
//! request logic, `commit.rs` for group and periodic commits, `reserve.rs` for the pre-zeroed
//! reserve and `background.rs` for the worker that keeps it full and frees deleted thins.
//!
//! ```
//! use std::sync::Arc;
//! use block_io::data::{rt, DataGeometry, IoBuf, MemDataDevice};
//! use block_io::MemMetaDevice;
//! use thin_pool::{Pool, PoolConfig};
//!
//! let data = Arc::new(MemDataDevice::new(DataGeometry::new(64 << 10, 64, 4096).unwrap()));
//! let meta = Arc::new(MemMetaDevice::new(256));
//! let dev = data.clone();
//! let pool = Pool::format(meta, 64, PoolConfig::default(), move || Ok(dev.clone())).unwrap();
//! pool.create_thin(1).unwrap();
//! let thin = pool.open_thin(1).unwrap();
//! rt::block_on(async {
//!     let (r, _) = thin.write(&data, 4096, IoBuf::filled(4096, 7), false).await;
//!     r.unwrap();
//!     thin.flush(&data).await.unwrap();
//!     let (r, buf) = thin.read(&data, 0, IoBuf::new(8192)).await;
//!     r.unwrap();
//!     assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 7));
//! });
//! ```

mod background;
mod bufs;
mod commit;
mod config;
mod error;
mod event;
#[cfg(feature = "model")]
pub mod model;
mod pool;
mod reserve;
mod status;
mod thin;

pub use config::{ChangeLog, EventHook, NoSpacePolicy, PoolConfig, ReserveZeroing};
pub use error::{PoolError, Result};
pub use pool::{DeviceFactory, Pool};
pub use reserve::{FIRST_RESERVED_ID, RESERVE_THIN};
pub use status::{PoolEvent, PoolMode, PoolStats, PoolStatus, ThinStatus};
pub use thin::Thin;
