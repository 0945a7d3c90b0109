//! The pool daemon: holds one pool open (and locked), serves its thins as ublk devices, and
//! answers commands on a root-only control socket.
//!
//! Startup: its own mount namespace (so its exit never races a filesystem mounted on its own
//! device), the pool's lock, the pool, then the devices its sidecar says were exposed: a
//! device left quiesced by a daemon that died is reattached (user recovery; the driver
//! reissues the requests that were in flight), one that is gone is forgotten. Then the socket.
//!
//! Stop (`pool stop`, SIGTERM, SIGINT): every device is stopped (the driver drains its
//! requests first), the pool commits and closes, the socket and pid file go.

use crate::changes::ChangeFile;
use crate::dirs::Dirs;
use crate::engine::OpenPool;
use crate::ops::{self, Devices};
use crate::proto::{Request, Response};
use crate::sidecar::Exposure;
use anyhow::{bail, Context, Result};
use block_io::data::{DataFile, DirectIo};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use ublk_target::{DeviceOptions, Live, Start, Target};

/// How long a device may take to come up (TCG guests are slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A device being served, by thin name.
struct Served {
    dev_id: u32,
    bdev: String,
    thread: JoinHandle<()>,
}

struct State {
    op: OpenPool,
    devices: BTreeMap<String, Served>,
    /// NBD exports, by thin name.
    exports: BTreeMap<String, nbd_server::Export>,
}

/// The daemon's devices, as the pool commands see them.
struct DeviceView<'a> {
    served: &'a BTreeMap<String, Served>,
    exports: &'a BTreeMap<String, nbd_server::Export>,
    data: &'a DataFile,
}

impl Devices for DeviceView<'_> {
    fn bdev(&self, thin: &str) -> Option<String> {
        self.served
            .get(thin)
            .map(|s| s.bdev.clone())
            .or_else(|| self.exports.get(thin).map(|e| e.uri()))
    }

    fn data_grown(&self) -> Result<()> {
        let n = self
            .data
            .refresh_size()
            .context("re-reading the data device's size")?;
        tracing::info!("the data device now holds {n} blocks");
        Ok(())
    }
}

struct Daemon {
    name: String,
    data: Arc<DataFile>,
    state: Mutex<Option<State>>,
    stop: tokio::sync::Notify,
}

/// Runs the daemon of pool `name` in this process until it is stopped.
pub fn run(dirs: &Dirs, name: &str) -> Result<()> {
    // A panic on any thread (a queue's above all) must not leave a device whose requests
    // nobody completes: abort the whole daemon, so the driver quiesces its devices and
    // `thin-ctl recover` can reattach them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic: {info}; aborting so the devices wait for `thin-ctl recover`");
        std::process::abort();
    }));
    private_mounts();
    std::fs::create_dir_all(&dirs.run)
        .with_context(|| format!("creating {}", dirs.run.display()))?;
    let changes_path = dirs.run.join(format!("{name}.changes"));
    let mut lost: Option<Vec<u32>> = Some(Vec::new());
    let op = OpenPool::open_with(dirs, name, || {
        // Under the lock: the file, if any, is a dead daemon's.
        if changes_path.exists() {
            lost = ChangeFile::read_lost(&changes_path)
                .map_err(|e| tracing::error!("{e:#}; taking every thin as affected"))
                .unwrap_or(None);
        }
        let log: Arc<dyn thin_pool::ChangeLog> = Arc::new(ChangeFile::create(&changes_path)?);
        Ok(Some(log))
    })?;
    let pid_file = dirs.pid_file(name);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let data = Arc::new(
        DataFile::open(
            &op.sidecar.data,
            op.sidecar.block_size,
            DirectIo::Auto,
            &mut |w| tracing::warn!("data device: {w}"),
        )
        .with_context(|| format!("opening data device {}", op.sidecar.data.display()))?,
    );
    let daemon = Arc::new(Daemon {
        name: name.to_string(),
        data,
        state: Mutex::new(Some(State {
            op,
            devices: BTreeMap::new(),
            exports: BTreeMap::new(),
        })),
        stop: tokio::sync::Notify::new(),
    });
    daemon.reattach(lost.as_deref());

    let sock = dirs.socket(name);
    let _ = std::fs::remove_file(&sock);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let res = rt.block_on(async {
        let listener =
            UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!("pool {name:?}: serving on {}", sock.display());
        serve(daemon.clone(), listener).await
    });
    let _ = std::fs::remove_file(&sock);
    let closed = daemon.shutdown();
    if closed.is_ok() {
        // Everything acknowledged is committed: nothing for a successor to report.
        let _ = std::fs::remove_file(&changes_path);
    }
    let _ = std::fs::remove_file(&pid_file);
    res.and(closed)
}

/// Makes this process's mounts private, in a namespace of its own.
fn private_mounts() {
    // SAFETY: unshare and mount with constant arguments; failure is reported, not fatal.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            tracing::warn!(
                "unshare(CLONE_NEWNS): {}; the daemon shares the mount namespace, so do not \
                 unmount a filesystem on its device while stopping it",
                std::io::Error::last_os_error()
            );
            return;
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            tracing::warn!("making mounts private: {}", std::io::Error::last_os_error());
        }
    }
}

async fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = conn.context("accepting a control connection")?;
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(d, stream).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            _ = daemon.stop.notified() => return Ok(()),
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()) }
        }
    }
}

async fn client(daemon: Arc<Daemon>, stream: UnixStream) -> Result<()> {
    let cred = stream.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid() != 0 && cred.uid() != me {
        let (_, mut w) = stream.into_split();
        let r = Response::from_result(Err(anyhow::anyhow!(
            "permission denied: the pool daemon answers root only"
        )));
        w.write_all(format!("{}\n", serde_json::to_string(&r)?).as_bytes())
            .await?;
        return Ok(());
    }
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let stop = req == Request::Stop;
                let d = daemon.clone();
                let r = tokio::task::spawn_blocking(move || d.execute(&req))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("the command panicked: {e}")));
                if stop && r.is_ok() {
                    daemon.stop.notify_one();
                }
                Response::from_result(r)
            }
            Err(e) => Response::from_result(Err(anyhow::anyhow!("bad request: {e}"))),
        };
        w.write_all(format!("{}\n", serde_json::to_string(&resp)?).as_bytes())
            .await?;
    }
    Ok(())
}

impl Daemon {
    fn execute(&self, req: &Request) -> Result<Value> {
        let mut guard = self.state.lock();
        let st = guard.as_mut().context("the daemon is stopping")?;
        st.reap();
        match req {
            Request::Expose {
                thin,
                queues,
                depth,
                id,
                io_buf,
            } => self.expose(st, thin, *queues, *depth, *id, *io_buf),
            Request::Unexpose { thin } => {
                let bdev = st.unexpose(thin)?;
                Ok(json!({ "thin": thin, "device": bdev }))
            }
            Request::Export {
                thin,
                nbd,
                allow_remote,
            } => Self::export(st, thin, nbd, *allow_remote),
            Request::Unexport { thin } => {
                let e = st
                    .exports
                    .remove(thin)
                    .with_context(|| format!("thin {thin:?} is not exported"))?;
                let uri = e.uri();
                e.stop();
                Ok(json!({ "thin": thin, "uri": uri }))
            }
            Request::Stop => Ok(json!({ "stopping": self.name })),
            other => {
                let devices = DeviceView {
                    served: &st.devices,
                    exports: &st.exports,
                    data: &self.data,
                };
                ops::execute(&mut st.op, &devices, other)
            }
        }
    }

    fn expose(
        &self,
        st: &mut State,
        thin: &str,
        queues: u16,
        depth: u16,
        id: Option<u32>,
        io_buf: u32,
    ) -> Result<Value> {
        if let Some(s) = st.devices.get(thin) {
            bail!("thin {thin:?} is already exposed as {}", s.bdev);
        }
        let entry = st.op.sidecar.thin(thin)?.clone();
        if entry.size == 0 {
            bail!("thin {thin:?} has no size; set one with `thin-ctl resize`");
        }
        let opts = DeviceOptions {
            id,
            queues,
            depth,
            io_buf_bytes: io_buf,
            size_bytes: entry.size,
            ..DeviceOptions::default()
        };
        let served = self.start_device(st, thin, entry.id, &opts, Start::Add, false)?;
        let out = json!({ "thin": thin, "device": served.bdev, "dev_id": served.dev_id });
        st.op.sidecar.thin_mut(thin)?.exposed = Some(Exposure {
            dev_id: served.dev_id,
            queues,
            depth,
            io_buf_bytes: io_buf,
        });
        st.devices.insert(thin.to_string(), served);
        st.op.save()?;
        Ok(out)
    }

    /// Serves a thin over NBD until `unexport` or the daemon stops.
    fn export(st: &mut State, thin: &str, nbd: &str, allow_remote: bool) -> Result<Value> {
        if let Some(e) = st.exports.get(thin) {
            bail!("thin {thin:?} is already exported as {}", e.uri());
        }
        let entry = st.op.sidecar.thin(thin)?.clone();
        if entry.size == 0 {
            bail!("thin {thin:?} has no size; set one with `thin-ctl resize`");
        }
        let listen: nbd_server::Listen = nbd
            .parse()
            .map_err(|e| anyhow::anyhow!("--nbd {nbd}: {e}"))?;
        let sc = &st.op.sidecar;
        let mut cfg = nbd_server::ExportConfig::new(
            st.op.pool.clone(),
            entry.id,
            entry.size,
            listen,
            crate::engine::data_factory(&sc.data, sc.block_size),
        );
        cfg.allow_remote = allow_remote;
        cfg.name = thin.to_string();
        let export =
            nbd_server::Export::start(cfg).with_context(|| format!("exporting thin {thin:?}"))?;
        let uri = export.uri();
        tracing::info!("thin {thin:?} is exported as {uri}");
        st.exports.insert(thin.to_string(), export);
        Ok(json!({ "thin": thin, "uri": uri }))
    }

    /// Starts serving thin `thin_id` on its own thread; returns once the device is live.
    fn start_device(
        &self,
        st: &State,
        thin: &str,
        thin_id: u32,
        opts: &DeviceOptions,
        start: Start,
        lost_writes: bool,
    ) -> Result<Served> {
        let target = Target {
            pool: st.op.pool.clone(),
            thin_id,
            data: self.data.clone(),
            label: format!("{}/{thin}", self.name),
            lost_writes,
        };
        let (tx, rx) = mpsc::channel::<Result<Live, String>>();
        let opts = opts.clone();
        let thin_name = thin.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("dev-{thin}"))
            .spawn(move || {
                let live_tx = tx.clone();
                let r = ublk_target::serve(target, &opts, start, move |live| {
                    let _ = live_tx.send(Ok(live.clone()));
                });
                match r {
                    Ok(()) => tracing::info!("thin {thin_name:?}: device stopped"),
                    Err(e) => {
                        tracing::error!("thin {thin_name:?}: {e}");
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            })
            .context("spawning a device thread")?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(live)) => {
                tracing::info!("thin {thin:?} is {}", live.bdev.display());
                Ok(Served {
                    dev_id: live.dev_id,
                    bdev: live.bdev.display().to_string(),
                    thread,
                })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                bail!("exposing thin {thin:?}: {e}")
            }
            Err(_) => bail!(
                "exposing thin {thin:?}: the device did not come up within {} s",
                START_TIMEOUT.as_secs()
            ),
        }
    }

    /// Reattaches the devices a previous daemon left quiesced; forgets those that are gone.
    /// `lost` names the thins whose acknowledged writes died with it (`None`: any thin).
    fn reattach(&self, lost: Option<&[u32]>) {
        let mut guard = self.state.lock();
        let Some(st) = guard.as_mut() else { return };
        let exposed: Vec<(String, u32, Exposure)> = st
            .op
            .sidecar
            .thins
            .iter()
            .filter_map(|(n, t)| t.exposed.clone().map(|e| (n.clone(), t.id, e)))
            .collect();
        for (name, thin_id, e) in exposed {
            let state = ublk_target::state(e.dev_id);
            let served = match state {
                Ok(Some(ublk_target::DevState::Quiesced)) => {
                    let opts = DeviceOptions {
                        id: Some(e.dev_id),
                        queues: e.queues,
                        depth: e.depth,
                        io_buf_bytes: e.io_buf_bytes,
                        ..DeviceOptions::default()
                    };
                    let lost_writes = lost.is_none_or(|l| l.contains(&thin_id));
                    if lost_writes {
                        tracing::error!(
                            "thin {name:?}: the previous daemon died with writes it had \
                             acknowledged but not committed; they are lost, and the next flush \
                             of /dev/ublkb{} reports EIO",
                            e.dev_id
                        );
                    }
                    match self.start_device(
                        st,
                        &name,
                        thin_id,
                        &opts,
                        Start::Recover(e.dev_id),
                        lost_writes,
                    ) {
                        Ok(s) => Some(s),
                        Err(err) => {
                            tracing::error!(
                                "recovering /dev/ublkb{} of thin {name:?}: {err:#}",
                                e.dev_id
                            );
                            None
                        }
                    }
                }
                other => {
                    tracing::info!(
                        "thin {name:?}: /dev/ublkb{} is {other:?}, not waiting for us: forgotten",
                        e.dev_id
                    );
                    None
                }
            };
            match served {
                Some(s) => {
                    st.devices.insert(name, s);
                }
                None => {
                    if let Some(t) = st.op.sidecar.thins.get_mut(&name) {
                        t.exposed = None;
                    }
                }
            }
        }
        if let Err(e) = st.op.save() {
            tracing::error!("{e:#}");
        }
    }

    /// Stops every device and closes the pool.
    fn shutdown(&self) -> Result<()> {
        let Some(mut st) = self.state.lock().take() else {
            return Ok(());
        };
        for (_, e) in std::mem::take(&mut st.exports) {
            e.stop();
        }
        let names: Vec<String> = st.devices.keys().cloned().collect();
        for name in names {
            if let Err(e) = st.unexpose(&name) {
                tracing::error!("{e:#}");
            }
        }
        st.op.close()
    }
}

impl State {
    /// Forgets devices whose thread ended on its own (removed from outside, or failed).
    fn reap(&mut self) {
        let ended: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, s)| s.thread.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in ended {
            if let Some(s) = self.devices.remove(&name) {
                let _ = s.thread.join();
                tracing::warn!("thin {name:?}: {} went away", s.bdev);
            }
            if let Some(t) = self.op.sidecar.thins.get_mut(&name) {
                t.exposed = None;
            }
            let _ = self.op.save();
        }
    }

    /// Stops thin `name`'s device and waits for it to drain.
    fn unexpose(&mut self, name: &str) -> Result<String> {
        let s = self
            .devices
            .remove(name)
            .with_context(|| format!("thin {name:?} is not exposed"))?;
        let r = ublk_target::stop(s.dev_id);
        if let Err(e) = &r {
            tracing::warn!("stopping {}: {e}", s.bdev);
        }
        if s.thread.join().is_err() {
            tracing::error!("the device thread of thin {name:?} panicked");
        }
        if let Some(t) = self.op.sidecar.thins.get_mut(name) {
            t.exposed = None;
        }
        self.op.save()?;
        Ok(s.bdev)
    }
}

/// Starts the daemon of pool `name` in the background and waits until it answers.
pub fn spawn(dirs: &Dirs, name: &str, verbose: u8) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(&dirs.run)
        .with_context(|| format!("creating {}", dirs.run.display()))?;
    if let Some(pid) = dirs.daemon_pid(name) {
        bail!("pool {name:?} is already running (daemon pid {pid})");
    }
    let log_path = dirs.log_file(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let start_len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("finding thin-ctl's own path")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&dirs.state)
        .arg("--run-dir")
        .arg(&dirs.run);
    for _ in 0..verbose {
        cmd.arg("-v");
    }
    cmd.args(["pool", "start", "--foreground", name])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    let deadline = std::time::Instant::now() + START_TIMEOUT * 2;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = log.get(start_len as usize..).unwrap_or("").to_string();
            bail!(
                "the daemon exited ({status}) before it was ready:\n{}",
                tail.trim_end()
            );
        }
        if crate::client::ping(dirs, name).is_ok() {
            return Ok(child.id());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the daemon (pid {}) did not answer within {} s; see {}",
                child.id(),
                (START_TIMEOUT * 2).as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
