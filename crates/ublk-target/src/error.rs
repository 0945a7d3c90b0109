//! Errors of the ublk front end, each with what an operator should do about it.

/// Why a device could not be set up, started or stopped. (Request errors never get here:
/// they become errnos in `request::completion`.)
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/ublk-control does not exist: the ublk driver is not loaded (run `modprobe \
         ublk_drv`; it needs Linux 6.0 or later built with CONFIG_BLK_DEV_UBLK)"
    )]
    NoDriver,
    #[error("ublk devices can only be created by root (running as uid {0})")]
    NotRoot(u32),
    #[error(
        "io_uring is unavailable ({0}); check the sysctl kernel.io_uring_disabled and any \
         seccomp or container policy"
    )]
    NoIoUring(String),
    #[error("{0}")]
    Invalid(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("{what}: {detail}")]
    Ublk { what: String, detail: String },
    #[error("setting up a queue: {0}")]
    Setup(String),
    #[error("{0}")]
    Io(String),
}

/// A libublk error with what was being done; libublk's own messages omit the errno.
pub(crate) fn ublk_err(what: &str, e: libublk::UblkError) -> Error {
    let detail = match e {
        libublk::UblkError::OtherError(n) | libublk::UblkError::UringIOError(n) if n < 0 => {
            std::io::Error::from_raw_os_error(-n).to_string()
        }
        libublk::UblkError::IOError(io) => io.to_string(),
        other => format!("{other:?}"),
    };
    let what = what.to_string();
    if detail.contains("Permission denied") || detail.contains("Operation not permitted") {
        return Error::Ublk {
            what,
            detail: format!("{detail} (are you root?)"),
        };
    }
    Error::Ublk { what, detail }
}
