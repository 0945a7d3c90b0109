//! Opening a data device with the best engine that works, and `AnyDataDevice`, the enum the
//! pool can hold when it does not want to be generic.
//!
//! `EngineChoice::Auto` tries io_uring on the opening thread and falls back to the synchronous
//! engine when the ring cannot be set up (ENOSYS: no io_uring; EPERM: `kernel.io_uring_disabled`
//! or a seccomp/LSM policy; ENOMEM: the locked-memory limit), reporting one warning line that
//! says why and how to fix it. The line goes to the `on_warning` callback (stderr by default)
//! and stays readable as `AnyDataDevice::fallback_reason`: no global logger, nothing shared
//! between devices or tests.

use super::file::{DataFile, DirectIo, Prealloc};
use super::limits::{LimiterStats, Limits};
use super::rt::RingConfig;
use super::sync::{SyncDataDevice, SyncMode};
use super::uring::UringDataDevice;
use super::{
    BufResult, BufsResult, DataBlock, DataDevice, DataGeometry, DiscardPolicy, FaultyDataDevice,
    IoBuf, MemDataDevice, Primitive,
};
use std::fmt;
use std::io;
use std::path::Path;

/// Which engine to open a file with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring, or the synchronous engine (with a warning) if io_uring cannot be set up.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The synchronous engine, by choice (no warning).
    Sync,
}

/// Which engine a device runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// `UringDataDevice` on the standalone ring.
    Uring,
    /// `SyncDataDevice`.
    Sync,
    /// `MemDataDevice`.
    Memory,
    /// `FaultyDataDevice`.
    Faulty,
}

/// How to open or create a data device.
pub struct DataDeviceOptions {
    block_size_bytes: u64,
    engine: EngineChoice,
    direct: DirectIo,
    limits: Limits,
    ring: RingConfig,
    sync_mode: SyncMode,
    discard_policy: DiscardPolicy,
    warn: Box<dyn FnMut(&str)>,
}

impl fmt::Debug for DataDeviceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataDeviceOptions")
            .field("block_size_bytes", &self.block_size_bytes)
            .field("engine", &self.engine)
            .field("direct", &self.direct)
            .field("limits", &self.limits)
            .field("ring", &self.ring)
            .field("sync_mode", &self.sync_mode)
            .field("discard_policy", &self.discard_policy)
            .finish()
    }
}

impl DataDeviceOptions {
    /// Defaults: `Auto` engine, O_DIRECT, default limits and ring, pooled sync fallback,
    /// warnings to stderr.
    pub fn new(block_size_bytes: u64) -> Self {
        Self {
            block_size_bytes,
            engine: EngineChoice::default(),
            direct: DirectIo::default(),
            limits: Limits::default(),
            ring: RingConfig::default(),
            sync_mode: SyncMode::default(),
            discard_policy: DiscardPolicy::default(),
            warn: Box::new(|line| eprintln!("{line}")),
        }
    }

    /// Which engine to use.
    pub fn engine(mut self, engine: EngineChoice) -> Self {
        self.engine = engine;
        self
    }

    /// O_DIRECT or not.
    pub fn direct(mut self, direct: DirectIo) -> Self {
        self.direct = direct;
        self
    }

    /// In-flight I/O and memory limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How to build the standalone ring (size, and the setup-failure test hook).
    pub fn ring(mut self, ring: RingConfig) -> Self {
        self.ring = ring;
        self
    }

    /// Inline or pooled synchronous engine.
    pub fn sync_mode(mut self, mode: SyncMode) -> Self {
        self.sync_mode = mode;
        self
    }

    /// What a discard does on a regular file.
    pub fn discard_policy(mut self, policy: DiscardPolicy) -> Self {
        self.discard_policy = policy;
        self
    }

    /// Where warning lines go (default: stderr).
    pub fn on_warning(mut self, warn: impl FnMut(&str) + 'static) -> Self {
        self.warn = Box::new(warn);
        self
    }

    /// Opens an existing file or block device.
    pub fn open(mut self, path: impl AsRef<Path>) -> io::Result<AnyDataDevice> {
        let file = DataFile::open(path, self.block_size_bytes, self.direct, &mut *self.warn)?;
        self.engine_for(file)
    }

    /// Creates a new data file of `nr_blocks` blocks.
    pub fn create(
        mut self,
        path: impl AsRef<Path>,
        nr_blocks: u64,
        prealloc: Prealloc,
    ) -> io::Result<AnyDataDevice> {
        let file = DataFile::create(
            path,
            self.block_size_bytes,
            nr_blocks,
            prealloc,
            self.direct,
            &mut *self.warn,
        )?;
        self.engine_for(file)
    }

    fn engine_for(mut self, file: DataFile) -> io::Result<AnyDataDevice> {
        let fallback_reason = match self.engine {
            EngineChoice::Sync => None,
            EngineChoice::Uring | EngineChoice::Auto => {
                let ring = super::rt::StandaloneRing::new(self.ring);
                match ring.init() {
                    Ok(()) => {
                        let mut dev = UringDataDevice::new(file, self.limits, self.ring)?;
                        dev.set_discard_policy(self.discard_policy);
                        return Ok(AnyDataDevice::Uring(dev));
                    }
                    Err(e) if self.engine == EngineChoice::Uring => {
                        let cause = fallback_warning_cause(&e);
                        return Err(crate::meta::annotate(e, cause));
                    }
                    Err(e) => Some(fallback_warning(&e)),
                }
            }
        };
        let mut dev = SyncDataDevice::new(file, self.limits, self.sync_mode)?;
        dev.set_discard_policy(self.discard_policy);
        if let Some(reason) = fallback_reason {
            (self.warn)(&reason);
            dev.set_fallback_reason(reason);
        }
        Ok(AnyDataDevice::Sync(dev))
    }
}

/// Why io_uring setup failed and how to fix it, without the fallback part.
fn fallback_warning_cause(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available (ENOSYS: the kernel lacks \
            CONFIG_IO_URING, or a seccomp filter hides io_uring_setup); use a kernel with \
            io_uring and allow io_uring_setup/io_uring_enter/io_uring_register"
            .to_string(),
        Some(errno @ (libc::EPERM | libc::EACCES)) => {
            let name = if errno == libc::EPERM {
                "EPERM"
            } else {
                "EACCES"
            };
            match io_uring_disabled() {
                Some(level @ 1..) => format!(
                    "io_uring is disabled by kernel.io_uring_disabled={level} ({name}); run \
                     `sysctl -w kernel.io_uring_disabled=0`{}",
                    if level == 1 {
                        " or add this user to the group in kernel.io_uring_group"
                    } else {
                        ""
                    }
                ),
                _ => format!(
                    "io_uring_setup was refused ({name}: a seccomp filter or LSM policy, e.g. a \
                     container runtime's default profile); allow io_uring_setup, \
                     io_uring_enter and io_uring_register in that policy"
                ),
            }
        }
        Some(libc::ENOMEM) => format!(
            "the io_uring ring could not be allocated (ENOMEM: the locked-memory limit is {}); \
             raise it (`ulimit -l`, systemd LimitMEMLOCK=) or use a smaller ring",
            memlock_limit()
        ),
        _ => format!("io_uring setup failed ({e})"),
    }
}

/// The one warning line for falling back to synchronous I/O because of `e`.
pub(crate) fn fallback_warning(e: &io::Error) -> String {
    let cause = fallback_warning_cause(e);
    // "why: falling back ...; how to fix" as one line.
    match cause.split_once("; ") {
        Some((why, fix)) => {
            format!("warning: {why}: falling back to synchronous I/O (slower); to fix: {fix}")
        }
        None => format!("warning: {cause}: falling back to synchronous I/O (slower)"),
    }
}

fn io_uring_disabled() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn memlock_limit() -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points at a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return "unknown".to_string();
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", limit.rlim_cur / 1024)
    }
}

/// Any of block-io's data engines, for a pool that holds one without being generic.
#[derive(Debug)]
pub enum AnyDataDevice {
    /// io_uring on the standalone ring.
    Uring(UringDataDevice),
    /// The synchronous engine.
    Sync(SyncDataDevice),
    /// In memory.
    Memory(MemDataDevice),
    /// In memory, with faults.
    Faulty(FaultyDataDevice),
}

impl AnyDataDevice {
    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Self::Uring(_) => EngineKind::Uring,
            Self::Sync(_) => EngineKind::Sync,
            Self::Memory(_) => EngineKind::Memory,
            Self::Faulty(_) => EngineKind::Faulty,
        }
    }

    /// The warning line that explained a fallback to synchronous I/O, if there was one.
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            Self::Sync(dev) => dev.fallback_reason(),
            _ => None,
        }
    }

    /// In-flight counters of a file engine.
    pub fn limiter_stats(&self) -> Option<LimiterStats> {
        match self {
            Self::Uring(dev) => Some(dev.limiter_stats()),
            Self::Sync(dev) => Some(dev.limiter_stats()),
            _ => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $dev:ident => $call:expr) => {
        match $self {
            AnyDataDevice::Uring($dev) => $call,
            AnyDataDevice::Sync($dev) => $call,
            AnyDataDevice::Memory($dev) => $call,
            AnyDataDevice::Faulty($dev) => $call,
        }
    };
}

impl DataDevice for AnyDataDevice {
    fn geometry(&self) -> DataGeometry {
        delegate!(self, d => d.geometry())
    }

    async fn read(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        delegate!(self, d => d.read(block, offset_bytes, buf).await)
    }

    async fn write(&self, block: DataBlock, offset_bytes: u64, buf: IoBuf) -> BufResult<()> {
        delegate!(self, d => d.write(block, offset_bytes, buf).await)
    }

    async fn read_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        delegate!(self, d => d.read_vectored(block, offset_bytes, bufs).await)
    }

    async fn write_vectored(
        &self,
        block: DataBlock,
        offset_bytes: u64,
        bufs: Vec<IoBuf>,
    ) -> BufsResult {
        delegate!(self, d => d.write_vectored(block, offset_bytes, bufs).await)
    }

    async fn zero_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        delegate!(self, d => d.zero_blocks(first, nr_blocks).await)
    }

    async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        delegate!(self, d => d.copy_block(from, to).await)
    }

    async fn discard_blocks(&self, first: DataBlock, nr_blocks: u64) -> io::Result<Primitive> {
        delegate!(self, d => d.discard_blocks(first, nr_blocks).await)
    }

    async fn flush(&self) -> io::Result<()> {
        delegate!(self, d => d.flush().await)
    }
}
