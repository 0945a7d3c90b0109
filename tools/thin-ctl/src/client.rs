//! Talking to a pool's daemon, or doing the command ourselves when none runs.

use crate::dirs::Dirs;
use crate::engine::OpenPool;
use crate::ops::{self, NoDevices};
use crate::proto::{Request, Response};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Sends one request to pool `name`'s daemon. `Ok(None)` when no daemon listens.
pub fn request(dirs: &Dirs, name: &str, req: &Request) -> Result<Option<Value>> {
    let sock = dirs.socket(name);
    let mut stream = match UnixStream::connect(&sock) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied on {}: the pool daemon answers root only",
            sock.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", sock.display())),
    };
    // Snapshots quiesce, exposing a device may take a while under emulation.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading the daemon's answer on {}", sock.display()))?;
    if reply.is_empty() {
        bail!("the daemon closed the connection without answering (did it die? see its log)");
    }
    let resp: Response =
        serde_json::from_str(&reply).context("the daemon's answer is not valid")?;
    match (resp.ok, resp.error) {
        (true, _) => Ok(Some(resp.result)),
        (false, Some(e)) => bail!("{e}"),
        (false, None) => bail!("the daemon refused without saying why"),
    }
}

/// Whether the daemon answers.
pub fn ping(dirs: &Dirs, name: &str) -> Result<()> {
    match request(dirs, name, &Request::Ping)? {
        Some(_) => Ok(()),
        None => bail!("no daemon"),
    }
}

/// Runs `req` through the daemon if one runs, else on the pool opened here.
pub fn run(dirs: &Dirs, name: &str, req: &Request) -> Result<Value> {
    if let Some(v) = request(dirs, name, req)? {
        return Ok(v);
    }
    let mut op = OpenPool::open(dirs, name)?;
    let r = ops::execute(&mut op, &NoDevices, req);
    let closed = op.close();
    let v = r?;
    closed?;
    Ok(v)
}
