//! Opening a pool under its lock, and creating one.
//!
//! The lock is an exclusive `flock` on the metadata device, held by whoever has the pool
//! open (the daemon, or a command running without one), so no two processes ever open the
//! same pool. Block devices are also opened `O_EXCL`, which keeps the kernel's dm-thin (and
//! mounts) off them while we hold them.

use crate::dirs::Dirs;
use crate::sidecar::{PoolOptions, Sidecar};
use anyhow::{bail, Context, Result};
use block_io::data::{AnyDataDevice, DataDeviceOptions, Prealloc};
use block_io::{FileMetaDevice, MetaDevice};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thin_pool::{NoSpacePolicy, Pool, PoolConfig, ReserveZeroing};

/// Metadata blocks are 4 KiB.
pub const META_BLOCK_BYTES: u64 = 4096;
/// dm-thin's metadata device limit (larger devices work, the rest is unused).
pub const MAX_METADATA_BYTES: u64 = 16 << 30;

/// An open pool and its sidecar, with the lock that makes them ours.
#[derive(Debug)]
pub struct OpenPool {
    pub pool: Arc<Pool>,
    /// The metadata device, to grow it.
    pub meta: Arc<FileMetaDevice>,
    pub sidecar: Sidecar,
    pub dirs: Dirs,
    _lock: File,
}

impl OpenPool {
    /// Locks and opens pool `name`.
    pub fn open(dirs: &Dirs, name: &str) -> Result<OpenPool> {
        Self::open_with(dirs, name, || Ok(None))
    }

    /// Locks pool `name`, then calls `change_log` (which may now touch files only the lock
    /// holder may touch) and opens the pool with what it returns.
    pub fn open_with(
        dirs: &Dirs,
        name: &str,
        change_log: impl FnOnce() -> Result<Option<Arc<dyn thin_pool::ChangeLog>>>,
    ) -> Result<OpenPool> {
        let sidecar = Sidecar::load(&dirs.state, name)?;
        let lock = lock_pool(dirs, &sidecar)?;
        let change_log = change_log()?;
        let meta = Arc::new(
            FileMetaDevice::open(&sidecar.metadata)
                .with_context(|| format!("opening metadata {}", sidecar.metadata.display()))?,
        );
        let cfg = PoolConfig {
            change_log,
            ..pool_config(&sidecar.options)
        };
        let pool = Pool::open(
            meta.clone(),
            cfg,
            data_factory(&sidecar.data, sidecar.block_size),
        )
        .with_context(|| format!("opening pool {name:?}"))?;
        Ok(OpenPool {
            pool: Arc::new(pool),
            meta,
            sidecar,
            dirs: dirs.clone(),
            _lock: lock,
        })
    }

    pub fn save(&self) -> Result<()> {
        self.sidecar.save(&self.dirs.state)
    }

    /// Ids of the user's thins in the metadata (the pool's hidden ones excluded).
    pub fn thin_ids(&self) -> Vec<u32> {
        self.pool.thins()
    }

    /// Closes the pool (final commit) and reports any error.
    pub fn close(self) -> Result<()> {
        let name = self.sidecar.name.clone();
        match Arc::try_unwrap(self.pool) {
            Ok(pool) => pool
                .close()
                .with_context(|| format!("closing pool {name:?}")),
            Err(_) => bail!("pool {name:?} is still in use; it closes when its last user ends"),
        }
    }
}

/// Takes the pool's lock, or says who holds it.
pub fn lock_pool(dirs: &Dirs, sidecar: &Sidecar) -> Result<File> {
    // O_EXCL on a block device claims it: it fails while the kernel (an active dm-thin-pool,
    // a mount) uses it. Our own later opens are not exclusive and still work.
    let excl = if is_block_device(&sidecar.metadata) {
        libc::O_EXCL
    } else {
        0
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(excl)
        .open(&sidecar.metadata)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                anyhow::anyhow!(
                    "{} is in use by the kernel (an active dm-thin-pool or a mount?)",
                    sidecar.metadata.display()
                )
            } else {
                anyhow::Error::new(e)
                    .context(format!("opening metadata {}", sidecar.metadata.display()))
            }
        })?;
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let who = match dirs.daemon_pid(&sidecar.name) {
                Some(pid) => format!("its daemon (pid {pid}) is running"),
                None => "another thin-ctl has it open".to_string(),
            };
            bail!(
                "pool {:?} is busy: {who} ({} is locked)",
                sidecar.name,
                sidecar.metadata.display()
            );
        }
        return Err(e).context("locking the pool");
    }
    Ok(f)
}

/// The engine's configuration from the sidecar's options.
pub fn pool_config(o: &PoolOptions) -> PoolConfig {
    PoolConfig {
        reserve_blocks: o.reserve_blocks,
        reserve_zeroing: if o.zeroing == "primitive" {
            ReserveZeroing::Primitive
        } else {
            ReserveZeroing::WriteZeroes
        },
        low_water_mark_blocks: o.low_water_mark_blocks,
        no_space: if o.error_if_no_space {
            NoSpacePolicy::Error
        } else {
            NoSpacePolicy::Queue {
                timeout: Duration::from_secs(o.no_space_timeout_secs),
            }
        },
        discard_passdown: o.discard_passdown,
        on_event: Some(Arc::new(|ev| tracing::warn!("pool event: {ev:?}"))),
        ..PoolConfig::default()
    }
}

/// Opens the data device for the pool's background threads (io_uring, or the synchronous
/// fallback with a logged reason).
pub fn data_factory(
    path: &Path,
    block_size: u64,
) -> impl Fn() -> std::io::Result<AnyDataDevice> + Send + Sync + 'static {
    let path = path.to_path_buf();
    move || {
        DataDeviceOptions::new(block_size)
            .on_warning(|w| tracing::warn!("data device: {w}"))
            .open(&path)
    }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Size in bytes of a file or block device.
pub fn device_size(path: &Path) -> Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    block_io::device_size_bytes(&f).with_context(|| format!("size of {}", path.display()))
}

/// What `pool create` was asked for.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub name: String,
    pub metadata: PathBuf,
    pub data: PathBuf,
    pub data_size: Option<u64>,
    pub metadata_size: Option<u64>,
    pub block_size: u64,
    pub prealloc: Prealloc,
    pub force: bool,
    pub options: PoolOptions,
}

/// A metadata size that holds a full pool of `nr_blocks` mappings with room for snapshots:
/// about 64 bytes per mapping twice over, at least 4 MiB.
pub fn default_metadata_bytes(nr_blocks: u64) -> u64 {
    let want = nr_blocks.saturating_mul(128).max(4 << 20);
    want.div_ceil(1 << 20)
        .saturating_mul(1 << 20)
        .min(MAX_METADATA_BYTES)
}

/// Checks a data block size as dm-thin does: 64 KiB to 1 GiB, a multiple of 64 KiB.
pub fn check_block_size(bytes: u64) -> Result<()> {
    if !(64 << 10..=1 << 30).contains(&bytes) || !bytes.is_multiple_of(64 << 10) {
        bail!(
            "block size {}: must be a multiple of 64K from 64K to 1G (dm-thin's rule)",
            crate::size::format(bytes)
        );
    }
    Ok(())
}

/// Creates (or takes over) the files, formats the metadata and writes the sidecar.
pub fn create_pool(dirs: &Dirs, spec: &CreateSpec) -> Result<Sidecar> {
    crate::sidecar::check_name("pool", &spec.name)?;
    check_block_size(spec.block_size)?;
    if Sidecar::path(&dirs.state, &spec.name).exists() {
        bail!(
            "pool {:?} already exists ({})",
            spec.name,
            Sidecar::path(&dirs.state, &spec.name).display()
        );
    }
    // Data: an existing device or file is used as it is (grown to --data-size if a smaller
    // regular file); a missing file is created.
    let data_bytes = if spec.data.exists() {
        let have = device_size(&spec.data)?;
        match spec.data_size {
            Some(want) if want > have => {
                if is_block_device(&spec.data) {
                    bail!(
                        "--data-size {} but block device {} holds {}",
                        crate::size::format(want),
                        spec.data.display(),
                        crate::size::format(have)
                    );
                }
                grow_file(&spec.data, want)?;
                want
            }
            Some(want) => want,
            None => have,
        }
    } else {
        let want = spec.data_size.with_context(|| {
            format!(
                "{} does not exist: give --data-size to create it",
                spec.data.display()
            )
        })?;
        let nr = want / spec.block_size;
        let f = block_io::data::DataFile::create(
            &spec.data,
            spec.block_size,
            nr,
            spec.prealloc,
            block_io::data::DirectIo::Auto,
            &mut |w| tracing::warn!("data device: {w}"),
        )
        .with_context(|| format!("creating data file {}", spec.data.display()))?;
        drop(f);
        want
    };
    let nr_blocks = data_bytes / spec.block_size;
    if nr_blocks == 0 {
        bail!(
            "the data device holds less than one {} block",
            crate::size::format(spec.block_size)
        );
    }
    let meta_bytes = spec
        .metadata_size
        .unwrap_or_else(|| default_metadata_bytes(nr_blocks));
    let mut sidecar = Sidecar::new(
        &spec.name,
        absolute(&spec.metadata)?,
        absolute(&spec.data)?,
        spec.block_size,
    );
    sidecar.options = spec.options.clone();
    if !spec.metadata.exists() {
        // The lock needs the file; it is created empty and sized below.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&spec.metadata)
            .with_context(|| format!("creating metadata file {}", spec.metadata.display()))?;
    }
    let lock = lock_pool(dirs, &sidecar)?;
    let have = device_size(&spec.metadata)?;
    if have > 0 {
        refuse_clobber(&spec.metadata, spec.force)?;
    }
    if have < meta_bytes && !is_block_device(&spec.metadata) {
        grow_file(&spec.metadata, meta_bytes)?;
    }
    let meta: Arc<dyn MetaDevice> = Arc::new(FileMetaDevice::open(&spec.metadata)?);
    let pool = Pool::format(
        meta,
        nr_blocks,
        pool_config(&sidecar.options),
        data_factory(&spec.data, spec.block_size),
    )
    .context("formatting the pool")?;
    pool.close().context("closing the new pool")?;
    sidecar.save(&dirs.state)?;
    drop(lock);
    Ok(sidecar)
}

/// Adopts existing metadata (ours, or the kernel's) under a new name.
pub fn import_pool(dirs: &Dirs, name: &str, metadata: &Path, data: &Path) -> Result<Sidecar> {
    crate::sidecar::check_name("pool", name)?;
    if Sidecar::path(&dirs.state, name).exists() {
        bail!("pool {name:?} already exists");
    }
    let meta = FileMetaDevice::open(metadata)
        .with_context(|| format!("opening metadata {}", metadata.display()))?;
    let md = thin_metadata::ThinMetadata::open(Arc::new(meta))
        .with_context(|| format!("reading metadata {}", metadata.display()))?;
    let block_size = u64::from(md.status().data_block_size_sectors) * 512;
    drop(md);
    let mut sidecar = Sidecar::new(name, absolute(metadata)?, absolute(data)?, block_size);
    let op_lock = lock_pool(dirs, &sidecar)?;
    let meta: Arc<dyn MetaDevice> = Arc::new(FileMetaDevice::open(metadata)?);
    let pool = Pool::open(
        meta,
        pool_config(&sidecar.options),
        data_factory(data, block_size),
    )
    .context("opening the imported pool")?;
    for c in sidecar.reconcile(&pool.thins()) {
        tracing::info!("{c}");
    }
    pool.close()?;
    sidecar.save(&dirs.state)?;
    drop(op_lock);
    Ok(sidecar)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Grows a regular file to `bytes`, allocating the new range (as `--preallocate allocate`
/// does; sparse where the filesystem cannot allocate ahead).
pub fn grow_file(path: &Path, bytes: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if len < bytes {
        // SAFETY: fallocate on an fd we own, within i64 range (checked by try_from).
        let r = match (i64::try_from(len), i64::try_from(bytes - len)) {
            (Ok(off), Ok(n)) => unsafe { libc::fallocate(f.as_raw_fd(), 0, off, n) },
            _ => -1,
        };
        if r != 0 {
            f.set_len(bytes)
                .with_context(|| format!("growing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Refuses to format over what looks like a pool's metadata unless forced.
fn refuse_clobber(path: &Path, force: bool) -> Result<()> {
    let mut f = OpenOptions::new()
        .read(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut block = vec![0u8; 4096];
    use std::io::Read;
    let n = f.read(&mut block)?;
    // dm-thin's superblock magic, at byte 32 of block 0.
    let magic = 27022010u64.to_le_bytes();
    if n >= 40 && block[32..40] == magic && !force {
        bail!(
            "{} already holds thin-pool metadata; `thin-ctl pool import` adopts it, --force \
             formats over it (destroying every thin)",
            path.display()
        );
    }
    Ok(())
}
