//! The crate's one error type.

use std::fmt;

use crate::key::Key;

/// Why a lock operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A shared holder asked to upgrade while another holder of the key was already upgradable
    /// or exclusive, or a range or thin lock covering it was waiting or held. Waiting would deadlock if the
    /// other holder is itself waiting for this one to drain, so the shared lock has been
    /// released instead: take it again and look the block up afresh, because the other holder
    /// has probably changed its mapping.
    UpgradeRaced {
        /// The key whose shared lock was released.
        key: Key,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UpgradeRaced { key } => write!(
                f,
                "{key}: cannot upgrade, another holder is upgrading; the shared lock was \
                 released, take it again and redo the lookup"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's `Error`.
pub type Result<T> = std::result::Result<T, Error>;
