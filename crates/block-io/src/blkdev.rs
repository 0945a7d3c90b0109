//! Block-device ioctls libc does not export, shared by the metadata and data devices.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IO(0x12, 127)`: zero a byte range, `[u64 offset, u64 len]`.
pub(crate) const BLKZEROOUT: u64 = 0x127f;
/// `_IO(0x12, 119)`: discard a byte range, `[u64 offset, u64 len]`.
pub(crate) const BLKDISCARD: u64 = 0x1277;
/// `_IO(0x12, 104)`: logical block size, an `int`.
const BLKSSZGET: u64 = 0x1268;

/// `BLKGETSIZE64` is `_IOR(0x12, 114, size_t)`, laid out as the common `_IOC` (x86, arm,
/// riscv); the other layout puts `_IOC_READ` (2) at bit 29.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: u64 = (2 << 30) | ((std::mem::size_of::<usize>() as u64) << 16) | 0x1272;
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: u64 = (2 << 29) | ((std::mem::size_of::<usize>() as u64) << 16) | 0x1272;

pub(crate) fn range_ioctl(file: &File, request: u64, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: both requests read exactly two u64s through the pointer, which points at a
    // live local array; the fd is open for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size in bytes of an open regular file or block device.
pub fn device_size_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        block_device_size_bytes(file)
    } else {
        Ok(meta.len())
    }
}

pub(crate) fn block_device_size_bytes(file: &File) -> io::Result<u64> {
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live,
    // aligned local; the fd is open for the whole call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64 as libc::Ioctl,
            &mut size_bytes as *mut u64,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size_bytes)
}

pub(crate) fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKSSZGET as libc::Ioctl,
            &mut lbs as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(lbs).map_err(|_| io::Error::other(format!("BLKSSZGET returned {lbs}")))
}
