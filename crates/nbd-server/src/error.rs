//! Why an export could not start, each with what to do about it. (Request errors never get
//! here: they become NBD error values in `request::nbd_error`.)

use crate::config::Listen;
use thin_pool::PoolError;

/// Why `Export::start` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// A TCP address that other machines can reach, without `allow_remote`.
    #[error(
        "refusing to serve NBD on {0}: NBD has no authentication, so anyone who can reach \
         that address could read and overwrite the whole thin. Listen on a unix socket or a \
         loopback address (127.0.0.1, ::1) and tunnel to it, or pass --allow-remote if every \
         host on that network is trusted"
    )]
    RemoteRefused(Listen),

    /// Another server is listening there already.
    #[error("{0} is in use by a running server: stop it or pick another address")]
    InUse(Listen),

    /// Binding or setting up the listener failed.
    #[error("listening on {listen}: {source}")]
    Listen {
        listen: Listen,
        #[source]
        source: std::io::Error,
    },

    /// The thin could not be opened (it does not exist, or the pool is failing).
    #[error("opening thin {thin_id}: {source}")]
    Thin {
        thin_id: u32,
        #[source]
        source: PoolError,
    },

    /// A configuration value is out of range.
    #[error("invalid export configuration: {0}")]
    Invalid(String),

    /// The accepting thread could not be started.
    #[error("starting the NBD accept thread: {0}")]
    Thread(#[source] std::io::Error),
}
