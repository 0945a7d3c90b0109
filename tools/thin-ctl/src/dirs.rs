//! Where thin-ctl keeps things: sidecars in the state directory; sockets, pid files and
//! daemon logs in the run directory.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Dirs {
    pub state: PathBuf,
    pub run: PathBuf,
}

impl Dirs {
    /// The daemon's control socket.
    pub fn socket(&self, pool: &str) -> PathBuf {
        self.run.join(format!("{pool}.sock"))
    }

    /// The daemon's pid file.
    pub fn pid_file(&self, pool: &str) -> PathBuf {
        self.run.join(format!("{pool}.pid"))
    }

    /// The daemon's log (its stderr when started in the background).
    pub fn log_file(&self, pool: &str) -> PathBuf {
        self.run.join(format!("{pool}.log"))
    }

    /// The pid of pool `pool`'s daemon if its pid file names a live process.
    pub fn daemon_pid(&self, pool: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(pool))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
    }
}
