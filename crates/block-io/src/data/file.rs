//! The data device as an open file: a regular file or a block device, normally with O_DIRECT,
//! plus the synchronous primitives both file engines share (fallocate, BLKZEROOUT,
//! BLKDISCARD, zero-writing).
//!
//! Preallocation trade-off (seed 002: "writes into holes of sparse files stall", because the
//! filesystem must allocate inside the write): `Prealloc::Sparse` creates the file instantly
//! but the first write into each hole allocates; `Prealloc::Allocate` (fallocate mode 0) takes
//! the space up front as unwritten extents, so a first write only converts an extent (cheap,
//! journalled); `Prealloc::WriteZeroes` also writes every byte once, slow to create but then
//! every write runs at device speed. A pool's data file should be `Allocate` unless space is
//! meant to be overcommitted on the host.
//!
//! Invariants: every range reaching the file was checked against the geometry first, so a
//! write never extends a regular file; every error names the path; an unsupported fallocate
//! mode is remembered per file so the fallback is chosen once, not probed on every call.

use super::{DataGeometry, DiscardPolicy, Primitive};
use crate::meta::os_error;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes of zeros one synchronous zero-writing `pwrite` carries.
pub(crate) const MAX_ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// Whether to open the data device with O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// O_DIRECT or fail (the default: the page cache would double-buffer every block and
    /// hide write errors until `flush`).
    #[default]
    On,
    /// Buffered I/O (for filesystems without O_DIRECT, e.g. tmpfs before Linux 6.6).
    Off,
    /// O_DIRECT if the filesystem supports it, else buffered, with a warning.
    Auto,
}

/// How to create a new data file (see the module docs for the trade-off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prealloc {
    /// A sparse file: instant, but first writes into holes allocate (and stall).
    Sparse,
    /// `fallocate` the whole file: unwritten extents, no data written.
    #[default]
    Allocate,
    /// Write zeros over the whole file once.
    WriteZeroes,
}

/// Regular file or block device: it decides which zero/discard primitives exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A file on a filesystem: fallocate.
    Regular,
    /// A block device: BLKZEROOUT / BLKDISCARD.
    BlockDevice,
}

/// An open data device with its geometry.
pub struct DataFile {
    file: File,
    path: PathBuf,
    id: u64,
    kind: FileKind,
    direct: bool,
    /// Block size and alignment; the block count is `nr_blocks`, which `refresh_size` raises.
    geometry: DataGeometry,
    nr_blocks: AtomicU64,
    zero_range_unsupported: AtomicBool,
    punch_hole_unsupported: AtomicBool,
}

impl fmt::Debug for DataFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataFile")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("direct", &self.direct)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl AsRawFd for DataFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn annotate(e: io::Error, what: impl fmt::Display, path: &Path) -> io::Error {
    crate::meta::annotate(e, format!("{what} {}", path.display()))
}

impl DataFile {
    /// Opens an existing data device. `warn` receives one line if `DirectIo::Auto` had to fall
    /// back to buffered I/O. A trailing partial block is ignored.
    pub fn open(
        path: impl AsRef<Path>,
        block_size_bytes: u64,
        direct: DirectIo,
        warn: &mut dyn FnMut(&str),
    ) -> io::Result<Self> {
        let path = path.as_ref();
        let (file, is_direct) = open_file(path, direct, false, warn)?;
        Self::from_file(file, path, block_size_bytes, is_direct)
    }

    /// Creates a new regular data file of `nr_blocks` blocks (fails if `path` exists).
    pub fn create(
        path: impl AsRef<Path>,
        block_size_bytes: u64,
        nr_blocks: u64,
        prealloc: Prealloc,
        direct: DirectIo,
        warn: &mut dyn FnMut(&str),
    ) -> io::Result<Self> {
        let path = path.as_ref();
        let len_bytes = block_size_bytes.checked_mul(nr_blocks).ok_or_else(|| {
            invalid(format!(
                "{nr_blocks} data blocks of {block_size_bytes} bytes overflow a file size"
            ))
        })?;
        let (file, is_direct) = open_file(path, direct, true, warn)?;
        file.set_len(len_bytes)
            .map_err(|e| annotate(e, "sizing data file", path))?;
        if prealloc != Prealloc::Sparse && len_bytes > 0 {
            // SAFETY: plain syscall on an fd owned by `file`.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_bytes as libc::off_t) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(annotate(e, "preallocating data file", path));
            }
        }
        let data_file = Self::from_file(file, path, block_size_bytes, is_direct)?;
        if prealloc == Prealloc::WriteZeroes {
            data_file.write_zeroes_sync(0, len_bytes)?;
            data_file.sync_data()?;
        }
        Ok(data_file)
    }

    fn from_file(file: File, path: &Path, block_size_bytes: u64, direct: bool) -> io::Result<Self> {
        let meta = file
            .metadata()
            .map_err(|e| annotate(e, "querying data device", path))?;
        let (kind, len_bytes, align_bytes) = if meta.file_type().is_block_device() {
            let len = crate::blkdev::block_device_size_bytes(&file)
                .map_err(|e| annotate(e, "sizing block device", path))?;
            let lbs = crate::blkdev::logical_block_size(&file)
                .map_err(|e| annotate(e, "querying the logical block size of", path))?;
            (FileKind::BlockDevice, len, u64::from(lbs))
        } else {
            let align = if direct {
                dio_offset_align(path).unwrap_or(4096)
            } else {
                512
            };
            (FileKind::Regular, meta.len(), align)
        };
        let align_bytes = align_bytes.max(512);
        if !align_bytes.is_power_of_two() || align_bytes > 4096 {
            return Err(invalid(format!(
                "{} needs {align_bytes}-byte aligned direct I/O, which block-io does not support \
                 (at most 4096)",
                path.display()
            )));
        }
        let nr_blocks = len_bytes / block_size_bytes.max(1);
        let geometry = DataGeometry::new(block_size_bytes, nr_blocks, align_bytes)
            .map_err(|e| annotate(e, "data device", path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            id: next_id(),
            kind,
            direct,
            geometry,
            nr_blocks: AtomicU64::new(nr_blocks),
            zero_range_unsupported: AtomicBool::new(false),
            punch_hole_unsupported: AtomicBool::new(false),
        })
    }

    /// Block size, block count and alignment.
    pub fn geometry(&self) -> DataGeometry {
        DataGeometry {
            nr_blocks: self.nr_blocks.load(Ordering::Acquire),
            ..self.geometry
        }
    }

    /// Re-reads the device's size after it grew (a file extended, a block device resized),
    /// so that every engine over this file may use the new blocks. The count never shrinks:
    /// blocks a pool maps must stay addressable. Returns the block count.
    pub fn refresh_size(&self) -> io::Result<u64> {
        let len = match self.kind {
            FileKind::BlockDevice => crate::blkdev::block_device_size_bytes(&self.file),
            FileKind::Regular => self.file.metadata().map(|m| m.len()),
        }
        .map_err(|e| annotate(e, "sizing data device", &self.path))?;
        let nr = len / self.geometry.block_size_bytes.max(1);
        Ok(self.nr_blocks.fetch_max(nr, Ordering::AcqRel).max(nr))
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Regular file or block device.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Whether it is open with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Unique among the files this process opened: the standalone ring keys its fixed-file
    /// table by it.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The fallocate mode that zeroes a range on a regular file, unless known unsupported.
    pub(crate) fn zero_range_mode(&self) -> Option<i32> {
        (self.kind == FileKind::Regular && !self.zero_range_unsupported.load(Ordering::Relaxed))
            .then_some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
    }

    /// The fallocate mode and the primitive a discard uses on a regular file under `policy`.
    pub(crate) fn discard_mode(&self, policy: DiscardPolicy) -> Option<(i32, Primitive)> {
        match (self.kind, policy) {
            (FileKind::Regular, DiscardPolicy::PunchHole)
                if !self.punch_hole_unsupported.load(Ordering::Relaxed) =>
            {
                Some((
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    Primitive::FallocPunchHole,
                ))
            }
            (FileKind::Regular, DiscardPolicy::ZeroRange) => self
                .zero_range_mode()
                .map(|mode| (mode, Primitive::FallocZeroRange)),
            _ => None,
        }
    }

    /// Records that a fallocate `mode` failed with EOPNOTSUPP, so later calls skip it.
    /// Returns whether `e` was that error.
    pub(crate) fn note_unsupported(&self, mode: i32, e: &io::Error) -> bool {
        if !matches!(os_error(e), Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
            return false;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.punch_hole_unsupported.store(true, Ordering::Relaxed);
        } else {
            self.zero_range_unsupported.store(true, Ordering::Relaxed);
        }
        true
    }

    pub(crate) fn fallocate_sync(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd owned by `self.file`.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Zeroes `[offset, offset + len)` with the cheapest primitive that works, synchronously.
    pub(crate) fn zero_sync(&self, offset: u64, len: u64) -> io::Result<Primitive> {
        if self.kind == FileKind::BlockDevice {
            crate::blkdev::range_ioctl(&self.file, crate::blkdev::BLKZEROOUT, offset, len)
                .map_err(|e| self.err(e, "zeroing (BLKZEROOUT)", offset, len))?;
            return Ok(Primitive::BlkZeroOut);
        }
        if let Some(mode) = self.zero_range_mode() {
            match self.fallocate_sync(mode, offset, len) {
                Ok(()) => return Ok(Primitive::FallocZeroRange),
                Err(e) if self.note_unsupported(mode, &e) => {}
                Err(e) => return Err(self.err(e, "zeroing (FALLOC_FL_ZERO_RANGE)", offset, len)),
            }
        }
        self.write_zeroes_sync(offset, len)?;
        Ok(Primitive::WriteZeroes)
    }

    /// Discards `[offset, offset + len)` under `policy`, synchronously.
    pub(crate) fn discard_sync(
        &self,
        offset: u64,
        len: u64,
        policy: DiscardPolicy,
    ) -> io::Result<Primitive> {
        if policy == DiscardPolicy::Ignore {
            return Ok(Primitive::Ignored);
        }
        if self.kind == FileKind::BlockDevice {
            return match crate::blkdev::range_ioctl(
                &self.file,
                crate::blkdev::BLKDISCARD,
                offset,
                len,
            ) {
                Ok(()) => Ok(Primitive::BlkDiscard),
                // A device without discard support: a discard is only a hint.
                Err(e) if os_error(&e) == Some(libc::EOPNOTSUPP) => Ok(Primitive::Ignored),
                Err(e) => Err(self.err(e, "discarding (BLKDISCARD)", offset, len)),
            };
        }
        if let Some((mode, primitive)) = self.discard_mode(policy) {
            match self.fallocate_sync(mode, offset, len) {
                Ok(()) => return Ok(primitive),
                Err(e) if self.note_unsupported(mode, &e) => {}
                Err(e) => return Err(self.err(e, "discarding (fallocate)", offset, len)),
            }
        }
        // Discard is a hint, but callers rely on "discarded data reads back as zeros" on
        // regular files, so keep that when no fallocate mode is available.
        self.zero_sync(offset, len)
    }

    /// Writes zeros over `[offset, offset + len)` in chunks of at most 1 MiB.
    pub(crate) fn write_zeroes_sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = len.min(MAX_ZERO_CHUNK_BYTES) as usize;
        let zeros = super::IoBuf::new(chunk);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(|e| self.err(e, "writing zeros", offset + done, n as u64))?;
            done += n as u64;
        }
        Ok(())
    }

    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.file
            .sync_data()
            .map_err(|e| annotate(e, "flushing data device", &self.path))
    }

    /// Wraps `e` with the operation, byte range and path.
    pub(crate) fn err(&self, e: io::Error, what: &str, offset: u64, len: u64) -> io::Error {
        crate::meta::annotate(
            e,
            format!(
                "{what} bytes {offset}..{} of data device {}",
                offset + len,
                self.path.display()
            ),
        )
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn open_file(
    path: &Path,
    direct: DirectIo,
    create: bool,
    warn: &mut dyn FnMut(&str),
) -> io::Result<(File, bool)> {
    let open = |o_direct: bool| {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if create {
            opts.create_new(true);
        }
        if o_direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        opts.open(path)
    };
    let what = if create {
        "creating data file"
    } else {
        "opening data device"
    };
    if direct == DirectIo::Off {
        return open(false)
            .map(|f| (f, false))
            .map_err(|e| annotate(e, what, path));
    }
    match open(true) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if direct == DirectIo::On {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{what} {}: the filesystem does not support O_DIRECT (tmpfs before \
                         Linux 6.6?): put the \
                         data device on a disk filesystem or a block device, or open it with \
                         DirectIo::Auto/Off",
                        path.display()
                    ),
                ));
            }
            warn(&format!(
                "warning: {} does not support O_DIRECT: using buffered I/O (slower, and write \
                 errors may show only at flush); move it to a disk filesystem to fix",
                path.display()
            ));
            // `create_new` may have created the file before O_DIRECT was refused.
            let file = if create {
                OpenOptions::new().read(true).write(true).open(path)
            } else {
                open(false)
            };
            file.map(|f| (f, false))
                .map_err(|e| annotate(e, what, path))
        }
        Err(e) => Err(annotate(e, what, path)),
    }
}

/// The O_DIRECT offset alignment statx reports (Linux 6.1+), if any.
fn dio_offset_align(path: &Path) -> Option<u64> {
    let mut c_path = path.as_os_str().as_bytes().to_vec();
    c_path.push(0);
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `stx` is a live, writable
    // statx the kernel fills.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c_path.as_ptr().cast(),
            0,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0)
        .then_some(u64::from(
            stx.stx_dio_offset_align.max(stx.stx_dio_mem_align),
        ))
}
