//! The engine's one error type, and the one place it becomes an errno.

use std::io;

/// Why a request or a pool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No data block is free (and the queue timeout, if any, ran out).
    #[error("the pool is out of data space: grow it or discard unused blocks")]
    NoDataSpace,

    /// Metadata space is down to its reserve: new provisioning is refused so that commits can
    /// always complete.
    #[error("the pool's metadata space is low: new provisioning refused (grow the metadata)")]
    NoMetadataSpace,

    /// The pool latched read-only after a metadata error: reads go on, changes are refused.
    #[error("the pool is read-only after a metadata error ({0}): run thin-ctl check")]
    ReadOnly(String),

    /// The pool failed: every request gets an error.
    #[error("the pool has failed ({0}): run thin-ctl check")]
    Failed(String),

    /// The data device failed this request.
    #[error("data device I/O failed: {0}")]
    DataIo(#[source] io::Error),

    /// A metadata operation failed (control operations only; requests map it to a mode).
    #[error(transparent)]
    Metadata(#[from] thin_metadata::Error),

    /// A request or argument is malformed: unaligned, out of range, or a reserved id.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// The thin is open (exposed or in use) and cannot be deleted.
    #[error("thin {0} is open: close it (unexpose it) before deleting it")]
    Busy(u32),

    /// No thin with this id exists.
    #[error("thin {0} does not exist")]
    UnknownThin(u32),

    /// A thin with this id exists already.
    #[error("thin {0} exists already")]
    ThinExists(u32),

    /// The pool is closing.
    #[error("the pool is shutting down")]
    ShuttingDown,
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, PoolError>;

impl PoolError {
    /// The positive errno a block device front end completes the request with (negate it for
    /// ublk).
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::NoDataSpace | PoolError::NoMetadataSpace => libc_errno::ENOSPC,
            PoolError::Invalid(_) => libc_errno::EINVAL,
            PoolError::Busy(_) => libc_errno::EBUSY,
            PoolError::UnknownThin(_) => libc_errno::ENODEV,
            PoolError::ThinExists(_) => libc_errno::EEXIST,
            PoolError::ShuttingDown => libc_errno::ESHUTDOWN,
            PoolError::DataIo(e) => match e.kind() {
                io::ErrorKind::InvalidInput => libc_errno::EINVAL,
                _ => libc_errno::EIO,
            },
            PoolError::Metadata(e) => match e {
                thin_metadata::Error::NoSpace(_) => libc_errno::ENOSPC,
                thin_metadata::Error::UnknownThin(_) => libc_errno::ENODEV,
                thin_metadata::Error::ThinExists(_) => libc_errno::EEXIST,
                thin_metadata::Error::InvalidArgument(_) => libc_errno::EINVAL,
                _ => libc_errno::EIO,
            },
            PoolError::ReadOnly(_) | PoolError::Failed(_) => libc_errno::EIO,
        }
    }
}

/// The errno values used above (Linux numbering; the engine has no libc dependency).
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const ESHUTDOWN: i32 = 108;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_linux_ones() {
        assert_eq!(PoolError::NoDataSpace.errno(), 28);
        assert_eq!(PoolError::ReadOnly("x".into()).errno(), 5);
        assert_eq!(PoolError::Invalid("x".into()).errno(), 22);
        assert_eq!(
            PoolError::DataIo(io::Error::other("boom")).errno(),
            5,
            "a data device error is EIO"
        );
    }
}
