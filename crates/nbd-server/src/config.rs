//! What an export serves and where: `ExportConfig` and `Listen`.
//!
//! The one policy decided here: a TCP listener on an address other than loopback is refused
//! unless the caller says `allow_remote`, because NBD has no authentication (and this server
//! no TLS): anyone who can reach the port can read and overwrite the whole thin.

use crate::error::ExportError;
use block_io::data::rt::RingConfig;
use block_io::data::AnyDataDevice;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use thin_pool::Pool;

/// Opens a data device for one connection; called on the connection's own thread, so an
/// io_uring engine lands on that thread's ring.
pub type DeviceFactory<D> = Arc<dyn Fn() -> io::Result<D> + Send + Sync>;

/// The largest read or write payload advertised by default: 32 MiB, the size the NBD spec
/// says no client should be refused (2^25).
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// Where an export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (created 0600; a stale socket left by a dead server is
    /// replaced, a live one is not).
    Unix(PathBuf),
    /// A TCP address. Port 0 picks a free port (see `Export::listen`).
    Tcp(SocketAddr),
}

impl Listen {
    /// Whether only this machine can connect.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Unix(_) => true,
            Listen::Tcp(addr) => addr.ip().is_loopback(),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl FromStr for Listen {
    type Err = ExportError;

    /// `unix:PATH` or `tcp:HOST:PORT` (`tcp:[::1]:10809` for IPv6; a host name resolves to
    /// its first address).
    fn from_str(s: &str) -> Result<Listen, ExportError> {
        let bad = |why: String| ExportError::Invalid(format!("listen address {s:?}: {why}"));
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the socket path is empty".into()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp:") {
            let mut addrs = hostport
                .to_socket_addrs()
                .map_err(|e| bad(format!("{e} (expected HOST:PORT)")))?;
            return addrs
                .next()
                .map(Listen::Tcp)
                .ok_or_else(|| bad("the host name resolves to no address".into()));
        }
        Err(bad("expected unix:PATH or tcp:HOST:PORT".into()))
    }
}

/// Everything `Export::start` needs. Build it with `new`, then change the public fields
/// whose defaults do not suit.
#[non_exhaustive]
pub struct ExportConfig<D = AnyDataDevice> {
    /// The pool the thin lives in.
    pub pool: Arc<Pool>,
    /// The thin to serve (a snapshot is a thin too).
    pub thin_id: u32,
    /// The export's size: a multiple of the thin's I/O alignment (`Thin::align_bytes`).
    pub size_bytes: u64,
    /// Opens each connection's data device (see `DeviceFactory`).
    pub device: DeviceFactory<D>,
    /// Where to listen.
    pub listen: Listen,
    /// Allow a TCP address other than loopback. NBD has no authentication: set this only on
    /// a network where everyone who can reach the port may read and write the thin.
    pub allow_remote: bool,
    /// The export's name; clients may also ask for the default export (the empty name).
    pub name: String,
    /// Refuse writes, trims and write-zeroes with EPERM, and tell clients so.
    pub read_only: bool,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Requests of one connection being served at once; the connection reads no further
    /// requests until one finishes (clients see back-pressure, never an error).
    pub max_in_flight: usize,
    /// Bytes of request and reply data one connection may hold at once (reads, writes and
    /// write-zeroes buffers). At least `max_payload_bytes`.
    pub max_in_flight_bytes: usize,
    /// The largest read or write a client may send (advertised in `NBD_INFO_BLOCK_SIZE`).
    pub max_payload_bytes: u32,
    /// How long `Export::stop` lets connections finish their requests and send the replies
    /// before it cuts them off (the requests still complete; only the replies are lost).
    pub drain_timeout: Duration,
    /// How each connection's io_uring is built (its socket waits use it). A test can make
    /// its setup fail to exercise the fallback to a reactor thread.
    pub ring: RingConfig,
}

impl<D> fmt::Debug for ExportConfig<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportConfig")
            .field("thin_id", &self.thin_id)
            .field("size_bytes", &self.size_bytes)
            .field("listen", &self.listen)
            .field("allow_remote", &self.allow_remote)
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("max_connections", &self.max_connections)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl<D> ExportConfig<D> {
    /// A configuration with defaults: loopback only, read-write, 16 connections of up to 128
    /// requests and 64 MiB each, 32 MiB payloads, 30 s to drain on stop.
    pub fn new(
        pool: Arc<Pool>,
        thin_id: u32,
        size_bytes: u64,
        listen: Listen,
        device: impl Fn() -> io::Result<D> + Send + Sync + 'static,
    ) -> Self {
        ExportConfig {
            pool,
            thin_id,
            size_bytes,
            device: Arc::new(device),
            listen,
            allow_remote: false,
            name: String::new(),
            read_only: false,
            max_connections: 16,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            drain_timeout: Duration::from_secs(30),
            ring: RingConfig::default(),
        }
    }

    /// Checks everything that does not need the pool.
    pub(crate) fn validate(&self) -> Result<(), ExportError> {
        if !self.allow_remote && !self.listen.is_local() {
            return Err(ExportError::RemoteRefused(self.listen.clone()));
        }
        let invalid = |s: String| Err(ExportError::Invalid(s));
        if self.max_connections == 0 || self.max_in_flight == 0 {
            return invalid("max_connections and max_in_flight must be at least 1".into());
        }
        if self.max_payload_bytes < 4096 {
            return invalid(format!(
                "max_payload_bytes {} is below 4096, the preferred block size",
                self.max_payload_bytes
            ));
        }
        if self.max_payload_bytes as usize > block_io::data::MAX_IO_BUF_BYTES {
            return invalid(format!(
                "max_payload_bytes {} exceeds the largest I/O buffer, {} bytes",
                self.max_payload_bytes,
                block_io::data::MAX_IO_BUF_BYTES
            ));
        }
        if (self.max_in_flight_bytes as u64) < u64::from(self.max_payload_bytes) {
            return invalid(format!(
                "max_in_flight_bytes {} cannot hold one request of max_payload_bytes {}",
                self.max_in_flight_bytes, self.max_payload_bytes
            ));
        }
        if self.name.len() > 4096 || self.name.contains('\0') {
            return invalid("the export name must be at most 4096 bytes, without NUL".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp:[::1]:0".parse::<Listen>().unwrap(),
            Listen::Tcp("[::1]:0".parse().unwrap())
        );
        assert!("tcp:localhost:1".parse::<Listen>().unwrap().is_local());
        assert!(!"tcp:0.0.0.0:1".parse::<Listen>().unwrap().is_local());
        assert!(!"tcp:192.0.2.1:1".parse::<Listen>().unwrap().is_local());
        for bad in ["unix:", "tcp:nope", "x:1", "/run/x.sock", "tcp:1.2.3.4"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }
}
