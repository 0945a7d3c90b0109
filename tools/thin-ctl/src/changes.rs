//! Which thins have uncommitted changes, kept in shared memory so that the next daemon
//! learns it when this one is killed.
//!
//! A daemon killed between acknowledging a write that mapped a block and committing that
//! mapping loses the write, while the application, which never went away, goes on and its
//! next flush reaches the new daemon with nothing to commit. To tell the application, the
//! pool reports every mapping change (before acknowledging it) and every commit to a
//! `ChangeLog`; this one keeps them in a file in the run directory (tmpfs), mapped shared,
//! so every record is a plain atomic store that outlives the process. A daemon that starts
//! and finds the file reads which thins were ahead of the last commit; their recovered
//! devices fail their next flush with EIO. A graceful stop removes the file.
//!
//! Layout (native u64s, only ever accessed as atomics through the mapping): magic, durable seq, overflow seq, then `SLOTS` pairs of
//! (thin id + 1, last change seq). A thin takes a slot the first time it changes; thins
//! beyond `SLOTS` share the overflow seq, which flags every thin.

use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = 0x7468_696e_6368_6731; // "thinchg1"
const SLOTS: usize = 512;
const HEADER_WORDS: usize = 3;
const WORDS: usize = HEADER_WORDS + 2 * SLOTS;
const BYTES: usize = WORDS * 8;

/// The mapped change file of a running daemon.
#[derive(Debug)]
pub struct ChangeFile {
    base: *mut AtomicU64,
}

// SAFETY: the mapping is only accessed through atomics, and lives as long as the value.
unsafe impl Send for ChangeFile {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for ChangeFile {}

impl ChangeFile {
    /// Creates (replacing any old one) and maps the change file at `path`.
    pub fn create(path: &Path) -> Result<ChangeFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.set_len(BYTES as u64)?;
        let cf = Self::map(&f, path)?;
        cf.word(0).store(MAGIC, Ordering::SeqCst);
        Ok(cf)
    }

    /// Maps an existing change file (a dead daemon's).
    fn open(path: &Path) -> Result<ChangeFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if f.metadata()?.len() < BYTES as u64 {
            bail!("{} is truncated", path.display());
        }
        Self::map(&f, path)
    }

    fn map(f: &std::fs::File, path: &Path) -> Result<ChangeFile> {
        // SAFETY: a shared mapping of BYTES bytes of a file at least that long; it is
        // unmapped in Drop and never handed out beyond `self`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {}", path.display()));
        }
        Ok(ChangeFile {
            base: p.cast::<AtomicU64>(),
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: i is in bounds; the mapping is page-aligned, zero-initialised memory that
        // lives as long as `self` and is only ever accessed atomically.
        unsafe { &*self.base.add(i) }
    }

    /// The seq word of `thin`'s slot, taking a free slot if it has none.
    fn slot(&self, thin: u32) -> &AtomicU64 {
        let key = u64::from(thin) + 1;
        let start = (thin as usize).wrapping_mul(0x9E37_79B9) % SLOTS;
        for k in 0..SLOTS {
            let i = (start + k) % SLOTS;
            let kw = self.word(HEADER_WORDS + 2 * i);
            match kw.compare_exchange(0, key, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return self.word(HEADER_WORDS + 2 * i + 1),
                Err(k) if k == key => return self.word(HEADER_WORDS + 2 * i + 1),
                Err(_) => {}
            }
        }
        self.word(2)
    }

    /// The thins a dead daemon's change file says had uncommitted changes (`None` for
    /// "every thin": more changed than it had slots for).
    pub fn read_lost(path: &Path) -> Result<Option<Vec<u32>>> {
        let cf = Self::open(path)?;
        let w = |i: usize| cf.word(i).load(Ordering::SeqCst);
        if w(0) != MAGIC {
            bail!("{} is not a change file", path.display());
        }
        let durable = w(1);
        if w(2) > durable {
            return Ok(None);
        }
        let mut lost = Vec::new();
        for i in 0..SLOTS {
            let (key, seq) = (w(HEADER_WORDS + 2 * i), w(HEADER_WORDS + 2 * i + 1));
            if key != 0 && seq > durable {
                lost.push((key - 1) as u32);
            }
        }
        Ok(Some(lost))
    }
}

impl thin_pool::ChangeLog for ChangeFile {
    fn changed(&self, thin: u32, seq: u64) {
        if thin < thin_pool::FIRST_RESERVED_ID {
            self.slot(thin).fetch_max(seq, Ordering::SeqCst);
        }
    }

    fn durable(&self, seq: u64) {
        self.word(1).fetch_max(seq, Ordering::SeqCst);
    }
}

impl Drop for ChangeFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, unmapped once.
        unsafe {
            libc::munmap(self.base.cast(), BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thin_pool::ChangeLog;

    #[test]
    fn a_successor_reads_which_thins_were_ahead_of_the_last_commit() {
        let path = std::env::temp_dir().join(format!("thin-ctl-changes-{}", std::process::id()));
        {
            let cf = ChangeFile::create(&path).unwrap();
            cf.changed(1, 5);
            cf.changed(2, 6);
            cf.durable(5);
            cf.changed(7, 9);
            cf.changed(thin_pool::RESERVE_THIN.0, 10);
            // Dropped without a clean stop: the file stays, as after SIGKILL.
        }
        let mut lost = ChangeFile::read_lost(&path).unwrap().unwrap();
        lost.sort();
        assert_eq!(lost, vec![2, 7]);
        {
            let cf = ChangeFile::create(&path).unwrap();
            for t in 0..(SLOTS as u32 + 1) {
                cf.changed(t, 100);
            }
            cf.durable(50);
        }
        assert_eq!(
            ChangeFile::read_lost(&path).unwrap(),
            None,
            "overflow flags all"
        );
        {
            let cf = ChangeFile::create(&path).unwrap();
            cf.changed(3, 4);
            cf.durable(4);
        }
        assert_eq!(ChangeFile::read_lost(&path).unwrap(), Some(vec![]));
        std::fs::write(&path, b"junk").unwrap();
        assert!(ChangeFile::read_lost(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
