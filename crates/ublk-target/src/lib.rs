//! ublk-target: thin volumes of a `thin_pool::Pool` served as `/dev/ublkbN` through libublk.
//!
//! One thread per queue, one async task per tag (libublk's documented pattern), and the
//! pool's data I/O on each queue's own io_uring, through block-io's engine over
//! [`ring::QueueRing`]. Device parameters tell the truth: the logical block size O_DIRECT on
//! the data device needs, the pool block size as optimal I/O and discard granularity, a
//! volatile cache with FUA so flushes reach the pool, write-zeroes. Devices are created with
//! user recovery: when the daemon dies the device waits, quiesced, and a restarted daemon
//! reattaches it (`Start::Recover`); requests that were in flight are reissued.
//!
//! Every request error becomes a negative errno in one function (`request::completion`);
//! nothing on the I/O path panics.

mod device;
mod error;
mod queue;
mod request;
mod ring;

pub use device::{
    logical_block_bytes, remove, serve, state, stop, DevState, DeviceOptions, Live, Start, Target,
    MAX_DEPTH, MAX_IO_BUF_BYTES, MAX_QUEUES, TARGET_NAME,
};
pub use error::Error;

/// Bytes of the placeholder buffer registered per tag with libublk (see `queue::setup`).
pub(crate) const REG_BUF_BYTES: usize = 4096;

/// Path of the ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Checks what serving a device needs, with an error that says what to do: the driver
/// loaded, root, io_uring allowed.
pub fn probe() -> Result<(), Error> {
    if !std::path::Path::new(UBLK_CONTROL).exists() {
        return Err(Error::NoDriver);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(Error::NotRoot(uid));
    }
    io_uring::IoUring::<io_uring::squeue::Entry>::new(4)
        .map(drop)
        .map_err(|e| match e.raw_os_error() {
            // Kernels before 5.12 charge ring memory to RLIMIT_MEMLOCK.
            Some(libc::ENOMEM) => Error::NoIoUring(format!(
                "{e}: the locked-memory limit is too small (raise `ulimit -l`, or \
                 LimitMEMLOCK= in a systemd unit)"
            )),
            _ => Error::NoIoUring(e.to_string()),
        })
}
