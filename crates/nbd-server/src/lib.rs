//! nbd-server: a thin of a `thin_pool::Pool` served over the NBD protocol, for clients that
//! have no ublk: qemu, libnbd and nbdkit's tools, fio's nbd engine, the kernel's nbd client,
//! other machines.
//!
//! One thread per connection: it opens its own data device, so the pool's data I/O runs on
//! that thread's io_uring (block-io's standalone ring), waits for its socket on the same ring,
//! and runs every request as its own task, replying in whatever order they finish. The
//! handshake is fixed newstyle with `NBD_OPT_GO`/`NBD_OPT_INFO`; the export offers flush, FUA,
//! trim, write-zeroes and multi-conn (see `request::Shape::flags` for why multi-conn is
//! safe), simple replies only. Every request error becomes an NBD error value in one function
//! (`request::nbd_error`); nothing on the request path panics on what a client sends.
//!
//! # Serving a thin (what `thin-ctl export` does)
//!
//! ```no_run
//! use block_io::data::DataDeviceOptions;
//! use nbd_server::{Export, ExportConfig, Listen};
//! use std::sync::Arc;
//!
//! # fn example(
//! #     pool: Arc<thin_pool::Pool>,
//! #     data_path: std::path::PathBuf,
//! #     block_size_bytes: u64,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! // `--nbd unix:PATH` or `--nbd tcp:HOST:PORT`; a TCP address other than loopback is
//! // refused unless `allow_remote` is set (`--allow-remote`): NBD has no authentication.
//! let listen: Listen = "unix:/run/ublk-thin/vol1.sock".parse()?;
//! let thin_id = 1;
//! let size_bytes = 10 << 30;
//! // Each connection opens its own data device, on its own thread.
//! let mut cfg = ExportConfig::new(pool, thin_id, size_bytes, listen, move || {
//!     DataDeviceOptions::new(block_size_bytes).open(&data_path)
//! });
//! cfg.allow_remote = false;
//! cfg.name = "vol1".into(); // clients may also ask for the default export, ""
//! let export = Export::start(cfg)?;
//! println!("serving {}", export.uri()); // nbd+unix:///vol1?socket=/run/ublk-thin/vol1.sock
//! // Later: stop accepting, finish what clients sent, close (dropping the export does too).
//! export.stop();
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod export;
mod handshake;
mod proto;
mod request;
mod socket;
mod transmission;

pub use config::{DeviceFactory, ExportConfig, Listen, DEFAULT_MAX_PAYLOAD_BYTES};
pub use error::ExportError;
pub use export::{Export, ExportStats};

pub(crate) use export::Stats;

#[cfg(test)]
mod tests {
    /// thin-ctl's daemon keeps exports in shared state and stops them from any thread.
    #[test]
    fn exports_and_their_configs_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Export>();
        send_sync::<crate::ExportConfig>();
        send_sync::<crate::ExportError>();
    }
}
