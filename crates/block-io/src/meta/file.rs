//! A metadata device over a regular file or a block device, with plain positioned I/O.
//!
//! Invariants: every access is range-checked against `nr_blocks` before it reaches the file,
//! so an out-of-range block never extends a regular file; every error names the block and the
//! path; `flush` returns only after `fdatasync` has. There is no cache: the page cache (or the
//! device) is the only buffer, and `flush` is what makes writes durable.

use super::{annotate, out_of_range, MetaBlock, MetaDevice, META_BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most blocks one coalesced write carries, which bounds the bounce buffer at 1 MiB.
const MAX_RUN_BLOCKS: usize = 256;

const BLOCK_SIZE_BYTES: u64 = META_BLOCK_SIZE as u64;

/// A metadata device backed by a file or block device opened read-write.
#[derive(Debug)]
pub struct FileMetaDevice {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    /// Atomic only so `grow` can take `&self` like the other devices; it changes rarely.
    nr_blocks: AtomicU64,
}

impl FileMetaDevice {
    /// Opens an existing file or block device. A trailing partial block is ignored.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| annotate(e, format!("opening metadata device {}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| annotate(e, format!("querying metadata device {}", path.display())))?;
        let is_block_device = meta.file_type().is_block_device();
        let len_bytes = if is_block_device {
            crate::blkdev::block_device_size_bytes(&file)
                .map_err(|e| annotate(e, format!("sizing block device {}", path.display())))?
        } else {
            meta.len()
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            is_block_device,
            nr_blocks: AtomicU64::new(len_bytes / BLOCK_SIZE_BYTES),
        })
    }

    /// Creates a new zero-filled file of `nr_blocks` blocks. Fails if `path` exists, so an
    /// existing pool's metadata is never clobbered by mistake.
    pub fn create(path: impl AsRef<Path>, nr_blocks: u64) -> io::Result<Self> {
        let path = path.as_ref();
        let len_bytes = blocks_to_bytes(nr_blocks, path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| annotate(e, format!("creating metadata file {}", path.display())))?;
        file.set_len(len_bytes)
            .map_err(|e| annotate(e, format!("sizing metadata file {}", path.display())))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            is_block_device: false,
            nr_blocks: AtomicU64::new(nr_blocks),
        })
    }

    /// The path the device was opened with, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows (never shrinks) a regular file to `nr_blocks`; new blocks read as zeros.
    /// A block device cannot be grown from here: resize it and reopen.
    pub fn grow(&self, nr_blocks: u64) -> io::Result<()> {
        if nr_blocks <= self.nr_blocks() {
            return Ok(());
        }
        if self.is_block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot grow block device {} from userspace: resize it and reopen",
                    self.path.display()
                ),
            ));
        }
        let len_bytes = blocks_to_bytes(nr_blocks, &self.path)?;
        self.file
            .set_len(len_bytes)
            .map_err(|e| annotate(e, format!("growing metadata file {}", self.path.display())))?;
        self.nr_blocks.store(nr_blocks, Ordering::Release);
        Ok(())
    }

    fn check_range(&self, block: u64) -> io::Result<()> {
        let nr_blocks = self.nr_blocks();
        if block < nr_blocks {
            Ok(())
        } else {
            Err(out_of_range(block, nr_blocks))
        }
    }

    /// Writes `nr` blocks from `bytes` starting at `first` in one pwrite.
    fn write_run(&self, first: u64, nr: usize, bytes: &[u8]) -> io::Result<()> {
        // `first` was range-checked, so the multiplication cannot overflow.
        self.file
            .write_all_at(bytes, first * BLOCK_SIZE_BYTES)
            .map_err(|e| {
                let end = first + nr as u64;
                annotate(
                    e,
                    format!(
                        "writing metadata blocks {first}..{end} of {}",
                        self.path.display()
                    ),
                )
            })
    }
}

impl MetaDevice for FileMetaDevice {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks.load(Ordering::Acquire)
    }

    fn read_block(&self, block: u64, buf: &mut MetaBlock) -> io::Result<()> {
        self.check_range(block)?;
        self.file
            .read_exact_at(buf, block * BLOCK_SIZE_BYTES)
            .map_err(|e| {
                annotate(
                    e,
                    format!("reading metadata block {block} of {}", self.path.display()),
                )
            })
    }

    fn write_block(&self, block: u64, buf: &MetaBlock) -> io::Result<()> {
        self.check_range(block)?;
        self.write_run(block, 1, buf)
    }

    /// Sorts the blocks and writes each run of adjacent blocks with one pwrite. When a block
    /// appears twice the later buffer wins, as it would with one `write_block` per entry.
    /// Every block is range-checked before anything is written.
    fn write_blocks(&self, blocks: &[(u64, &MetaBlock)]) -> io::Result<()> {
        for (block, _) in blocks {
            self.check_range(*block)?;
        }
        let mut sorted: Vec<(u64, &MetaBlock)> = blocks.to_vec();
        // Stable, so among equal block numbers the caller's order survives and the last wins.
        sorted.sort_by_key(|(block, _)| *block);
        let mut deduped: Vec<(u64, &MetaBlock)> = Vec::with_capacity(sorted.len());
        for entry in sorted {
            match deduped.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => deduped.push(entry),
            }
        }

        let mut bounce = Vec::new();
        let mut rest = deduped.as_slice();
        while let Some(&(first, first_buf)) = rest.first() {
            let run_len = rest
                .iter()
                .take(MAX_RUN_BLOCKS)
                .zip(first..)
                .take_while(|((block, _), expected)| block == expected)
                .count();
            let (run, tail) = rest.split_at(run_len);
            if run_len == 1 {
                // No copy needed for a lone block.
                self.write_run(first, 1, first_buf)?;
            } else {
                bounce.clear();
                for (_, buf) in run {
                    bounce.extend_from_slice(&buf[..]);
                }
                self.write_run(first, run_len, &bounce)?;
            }
            rest = tail;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| {
            annotate(
                e,
                format!("flushing metadata device {}", self.path.display()),
            )
        })
    }
}

fn blocks_to_bytes(nr_blocks: u64, path: &Path) -> io::Result<u64> {
    nr_blocks.checked_mul(BLOCK_SIZE_BYTES).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{nr_blocks} metadata blocks is too large for {}",
                path.display()
            ),
        )
    })
}
