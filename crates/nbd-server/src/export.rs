//! An export: the listener, its accept thread, and one thread per connection.
//!
//! Each connection thread opens its own data device (so io_uring I/O lands on that thread's
//! ring), does the handshake and serves requests, every request a task on the thread's
//! executor, until the client leaves. Connections share the pool and one `Thin` handle, which
//! keeps the thin from being deleted while it is exported.
//!
//! Invariants: at most `max_connections` connection threads exist; `stop` stops accepting,
//! ends each connection's reading, lets every request already read complete and its reply
//! go out (up to `drain_timeout`, after which only the sending of replies is cut short), and
//! joins every thread before the thin handle is dropped; a connection's failure, a panic
//! included, never touches another connection.

use crate::config::{ExportConfig, Listen};
use crate::error::ExportError;
use crate::handshake::{self, Offer};
use crate::request::Shape;
use crate::socket::{Reader, Socket, Stream};
use crate::transmission::{self, ConnLimits, End};
use block_io::data::rt::{block_on, RingConfig};
use block_io::data::DataDevice;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thin_pool::Thin;

/// Bytes of a connection's receive buffer: many 4 KiB writes per `read`.
const READ_BUF_BYTES: usize = 256 << 10;

/// Counters of an export (`Export::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportStats {
    /// Connections being served now.
    pub nr_connections: usize,
    pub connections_accepted: u64,
    /// Connections closed on arrival because `max_connections` were being served.
    pub connections_refused: u64,
    /// Requests read in the transmission phase (disconnects excluded).
    pub requests: u64,
    /// Replies that carried an error.
    pub error_replies: u64,
    /// Connections ended because a request could not be framed (a wrong magic).
    pub protocol_errors: u64,
}

/// Counters shared by the connection threads.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub protocol_errors: AtomicU64,
}

struct ConnEntry {
    /// A second handle on the connection's socket, to shut it down from `stop`.
    stream: Stream,
    thread: JoinHandle<()>,
}

/// What the accept thread and the connection threads share.
struct Shared {
    stopping: AtomicBool,
    conns: Mutex<Vec<ConnEntry>>,
    stats: Stats,
    warned_fallback: AtomicBool,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Vec<ConnEntry>> {
        // A panicking connection thread never holds this lock; keep going regardless.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins finished connection threads; returns how many are still running.
    fn reap(&self) -> usize {
        let mut conns = self.conns();
        let (done, running): (Vec<_>, Vec<_>) =
            conns.drain(..).partition(|c| c.thread.is_finished());
        *conns = running;
        let n = conns.len();
        drop(conns);
        for c in done {
            join(c.thread);
        }
        n
    }
}

/// Everything a connection thread needs.
struct Ctx<D> {
    shared: Arc<Shared>,
    /// Keeps the pool, its committer included, running while any connection may flush.
    _pool: Arc<thin_pool::Pool>,
    thin: Arc<Thin>,
    device: crate::config::DeviceFactory<D>,
    shape: Shape,
    limits: ConnLimits,
    name: String,
    description: String,
    ring: RingConfig,
    max_connections: usize,
}

/// A unix socket's path and the inode bound there, so that `stop` removes the file only
/// if no other server has replaced it since.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are small and latency-bound: never wait to coalesce them.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Unix(l) => Ok(l.try_clone()?.into()),
            Listener::Tcp(l) => Ok(l.try_clone()?.into()),
        }
    }
}

/// A thin served over NBD. Stops (draining requests) when dropped; `stop` does the same.
pub struct Export {
    shared: Arc<Shared>,
    listen: Listen,
    name: String,
    thin_id: u32,
    acceptor: Option<JoinHandle<()>>,
    /// A handle on the listening socket, to wake the accept thread by shutting it down.
    listener: OwnedFd,
    /// The socket file, removed on stop if it is still ours.
    unix_path: Option<SocketFile>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("listen", &self.listen)
            .field("thin_id", &self.thin_id)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Opens the thin, binds the listener and starts accepting connections.
    pub fn start<D: DataDevice + 'static>(cfg: ExportConfig<D>) -> Result<Export, ExportError> {
        cfg.validate()?;
        let thin = cfg
            .pool
            .open_thin(cfg.thin_id)
            .map_err(|source| ExportError::Thin {
                thin_id: cfg.thin_id,
                source,
            })?;
        let align = thin.align_bytes();
        if cfg.size_bytes == 0 || !cfg.size_bytes.is_multiple_of(align) {
            return Err(ExportError::Invalid(format!(
                "export size {} must be a non-zero multiple of the thin's {align}-byte I/O \
                 alignment",
                cfg.size_bytes
            )));
        }
        let min_block = u32::try_from(align)
            .ok()
            .filter(|&a| a <= 1 << 16)
            .ok_or_else(|| {
                ExportError::Invalid(format!("I/O alignment {align} exceeds NBD's 64 KiB"))
            })?;
        let (listener, listen, unix_path) = bind(&cfg.listen)?;
        let listen_err = |source| ExportError::Listen {
            listen: listen.clone(),
            source,
        };
        let listener_fd = listener.try_clone_fd().map_err(listen_err)?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            stats: Stats::default(),
            warned_fallback: AtomicBool::new(false),
        });
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            _pool: cfg.pool.clone(),
            thin: Arc::new(thin),
            device: cfg.device,
            shape: Shape {
                size_bytes: cfg.size_bytes,
                min_block,
                max_payload: cfg.max_payload_bytes,
                read_only: cfg.read_only,
            },
            limits: ConnLimits {
                max_in_flight: cfg.max_in_flight,
                max_in_flight_bytes: cfg.max_in_flight_bytes,
            },
            name: cfg.name.clone(),
            description: format!("ublk-thin thin {}", cfg.thin_id),
            ring: cfg.ring,
            max_connections: cfg.max_connections,
        });
        let acceptor = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&listener, &ctx))
            .map_err(ExportError::Thread)?;
        tracing::info!("thin {}: serving NBD on {listen}", cfg.thin_id);
        Ok(Export {
            shared,
            listen,
            name: cfg.name,
            thin_id: cfg.thin_id,
            acceptor: Some(acceptor),
            listener: listener_fd,
            unix_path,
            drain_timeout: cfg.drain_timeout,
        })
    }

    /// Where the export listens (with the port chosen if port 0 was asked for).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// An NBD URI clients accept (qemu, libnbd, fio's nbd engine):
    /// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`.
    pub fn uri(&self) -> String {
        let name = uri_escape(&self.name);
        match &self.listen {
            Listen::Unix(p) => format!(
                "nbd+unix:///{name}?socket={}",
                uri_escape(&p.to_string_lossy())
            ),
            Listen::Tcp(a) => format!("nbd://{a}/{name}"),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ExportStats {
        let s = &self.shared.stats;
        ExportStats {
            nr_connections: self
                .shared
                .conns()
                .iter()
                .filter(|c| !c.thread.is_finished())
                .count(),
            connections_accepted: s.accepted.load(Ordering::Relaxed),
            connections_refused: s.refused.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            error_replies: s.errors.load(Ordering::Relaxed),
            protocol_errors: s.protocol_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, lets every connection finish the requests it has read and send
    /// their replies (cut short after `drain_timeout`), and waits for all of them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket descriptor this struct owns; no memory is passed.
        // It wakes the accept thread, whose accept() then fails with EINVAL.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) };
        join(acceptor);
        if let Some(f) = self.unix_path.take() {
            let ours = std::fs::symlink_metadata(&f.path)
                .is_ok_and(|m| m.dev() == f.dev && m.ino() == f.ino);
            if ours {
                let _ = std::fs::remove_file(&f.path);
            }
        }
        let conns = std::mem::take(&mut *self.shared.conns());
        // Reading ends: each connection sees end of stream, completes what it has read and
        // sends the replies.
        for c in &conns {
            c.stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + self.drain_timeout;
        while conns.iter().any(|c| !c.thread.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in conns.iter().filter(|c| !c.thread.is_finished()) {
            tracing::warn!(
                "thin {}: an NBD client did not take its replies within {:?}: disconnecting it",
                self.thin_id,
                self.drain_timeout
            );
            c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            join(c.thread);
        }
        tracing::info!(
            "thin {}: NBD export on {} stopped",
            self.thin_id,
            self.listen
        );
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        tracing::error!("an NBD thread panicked; its connection was closed");
    }
}

/// Binds the listener; for a unix socket, replaces a stale socket file (one nobody accepts
/// on) but never a live one or anything that is not a socket.
fn bind(listen: &Listen) -> Result<(Listener, Listen, Option<SocketFile>), ExportError> {
    let err = |source| ExportError::Listen {
        listen: listen.clone(),
        source,
    };
    match listen {
        Listen::Unix(path) => {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if !m.file_type().is_socket() {
                    return Err(err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    )));
                }
                match UnixStream::connect(path) {
                    Ok(_) => return Err(ExportError::InUse(listen.clone())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).map_err(err)?;
                    }
                    Err(e) => return Err(err(e)),
                }
            }
            let l = UnixListener::bind(path).map_err(err)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
            let m = std::fs::symlink_metadata(path).map_err(err)?;
            Ok((
                Listener::Unix(l),
                listen.clone(),
                Some(SocketFile {
                    path: path.clone(),
                    dev: m.dev(),
                    ino: m.ino(),
                }),
            ))
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr).map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => ExportError::InUse(listen.clone()),
                _ => err(e),
            })?;
            let actual = l.local_addr().map_err(err)?;
            Ok((Listener::Tcp(l), Listen::Tcp(actual), None))
        }
    }
}

fn accept_loop<D: DataDevice + 'static>(listener: &Listener, ctx: &Arc<Ctx<D>>) {
    let shared = &ctx.shared;
    let mut next_id = 0u64;
    loop {
        let res = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match res {
            Ok(s) => s,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED) => {}
                    // Out of descriptors or memory: give the connections a moment to end.
                    _ => {
                        tracing::warn!("NBD accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
        };
        if shared.reap() >= ctx.max_connections {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "refusing an NBD connection: {} are being served already",
                ctx.max_connections
            );
            stream.shutdown(Shutdown::Both);
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("NBD connection dropped: {e}");
                continue;
            }
        };
        next_id += 1;
        let c = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{next_id}"))
            .spawn(move || serve_connection(stream, &c));
        match spawned {
            Ok(thread) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                shared.conns().push(ConnEntry {
                    stream: handle,
                    thread,
                });
            }
            Err(e) => {
                tracing::warn!("NBD connection dropped: no thread for it: {e}");
                handle.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Shuts a connection's socket down when its thread ends, however it ends: the client sees
/// the close, and no poll on the socket stays pending in the thread's ring.
struct CloseOnDrop(Option<Stream>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.shutdown(Shutdown::Both);
        }
    }
}

fn serve_connection<D: DataDevice>(stream: Stream, ctx: &Ctx<D>) {
    let _close = CloseOnDrop(stream.try_clone().ok());
    let dev = match (ctx.device)() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("NBD connection closed: opening the data device failed: {e}");
            return;
        }
    };
    let sock = match Socket::new(stream, ctx.ring) {
        Ok((sock, None)) => sock,
        Ok((sock, Some(why))) => {
            if !ctx.shared.warned_fallback.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "io_uring is unavailable for NBD sockets ({why}): waiting on them through \
                     a reactor thread instead, which is slower; check the sysctl \
                     kernel.io_uring_disabled and any seccomp or container policy"
                );
            }
            sock
        }
        Err(e) => {
            tracing::warn!("NBD connection closed: setting up its socket failed: {e}");
            return;
        }
    };
    let offer = Offer {
        name: &ctx.name,
        description: &ctx.description,
        shape: ctx.shape,
        stopping: &ctx.shared.stopping,
    };
    let end = block_on(async {
        let mut reader = Reader::new(READ_BUF_BYTES);
        match handshake::negotiate(&sock, &mut reader, &offer).await {
            Ok(true) => Some(
                transmission::serve(
                    &sock,
                    &mut reader,
                    &ctx.thin,
                    &dev,
                    &ctx.shape,
                    ctx.limits,
                    &ctx.shared.stats,
                )
                .await,
            ),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!("NBD handshake ended: {e}");
                None
            }
        }
    });
    match end {
        Some(End::BadMagic(m)) => tracing::warn!(
            "thin {}: an NBD client sent a request with magic {m:#x}: disconnected it",
            ctx.thin.id()
        ),
        Some(End::Io(e)) => tracing::debug!("NBD connection failed: {e}"),
        _ => {}
    }
    sock.shutdown(Shutdown::Both);
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `/`.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_reserved_characters() {
        assert_eq!(uri_escape("/tmp/a b?.sock"), "/tmp/a%20b%3F.sock");
        assert_eq!(uri_escape("vol-1_x.y~"), "vol-1_x.y~");
    }
}
