//! Shared by the integration tests: a pool on temporary files, an export of one of its thins,
//! and a small NBD client written from the spec, independently of the server's own encoding
//! (so a mistake made on both sides cannot cancel out).

#![allow(
    dead_code,
    clippy::big_endian_bytes,
    reason = "each test binary uses part of this; NBD is big-endian on the wire"
)]

use block_io::data::{DataDeviceOptions, Prealloc};
use block_io::MemMetaDevice;
use nbd_server::{Export, ExportConfig, Listen};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thin_pool::{Pool, PoolConfig};

pub const BLOCK_BYTES: u64 = 64 * 1024;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const DISC: u16 = 2;
pub const FLUSH: u16 = 3;
pub const TRIM: u16 = 4;
pub const CACHE: u16 = 5;
pub const WRITE_ZEROES: u16 = 6;
pub const FUA: u16 = 1;
pub const NO_HOLE: u16 = 2;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A directory under $TMPDIR removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "nbd-server-test-{what}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create the test directory");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pool over a data file in a temporary directory (metadata in memory), thin 1 created.
pub struct Rig {
    pub pool: Arc<Pool>,
    pub data: PathBuf,
    pub dir: TempDir,
}

impl Rig {
    pub fn new(what: &str, nr_blocks: u64) -> Rig {
        let dir = TempDir::new(what);
        let data = dir.path("data");
        DataDeviceOptions::new(BLOCK_BYTES)
            .create(&data, nr_blocks, Prealloc::Allocate)
            .expect("create the data file");
        let d = data.clone();
        let meta = Arc::new(MemMetaDevice::new(2048));
        let pool = Pool::format(meta, nr_blocks, PoolConfig::default(), move || {
            DataDeviceOptions::new(BLOCK_BYTES).open(&d)
        })
        .expect("format the pool");
        pool.create_thin(1).expect("create thin 1");
        Rig {
            pool: Arc::new(pool),
            data,
            dir,
        }
    }

    /// An export configuration of `thin` on a unix socket named `sock` in the rig's directory.
    pub fn config(&self, thin: u32, size_bytes: u64, sock: &str) -> ExportConfig {
        let d = self.data.clone();
        let mut cfg = ExportConfig::new(
            self.pool.clone(),
            thin,
            size_bytes,
            Listen::Unix(self.dir.path(sock)),
            move || DataDeviceOptions::new(BLOCK_BYTES).open(&d),
        );
        cfg.name = "vol".into();
        cfg
    }

    pub fn export(&self, thin: u32, size_bytes: u64, sock: &str) -> Export {
        Export::start(self.config(thin, size_bytes, sock)).expect("start the export")
    }
}

/// The socket path of a unix export.
pub fn socket_of(export: &Export) -> PathBuf {
    match export.listen() {
        Listen::Unix(p) => p.clone(),
        other => panic!("not a unix export: {other}"),
    }
}

/// An option reply: (option, reply type, data).
pub type OptReply = (u32, u32, Vec<u8>);

/// What NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE said.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_payload: u32,
}

/// A blocking NBD client over any stream.
pub struct Client<S: Read + Write> {
    pub s: S,
}

impl Client<UnixStream> {
    pub fn connect(path: &Path) -> Client<UnixStream> {
        let s = UnixStream::connect(path).expect("connect to the export");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client { s }
    }

    /// Connects and negotiates with NBD_OPT_GO for `name`.
    pub fn open(path: &Path, name: &str) -> (Client<UnixStream>, ExportInfo) {
        let mut c = Client::connect(path);
        c.greet(3);
        let info = c.go(name);
        (c, info)
    }
}

impl<S: Read + Write> Client<S> {
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from the server");
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_bytes(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_bytes(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_bytes(8).try_into().unwrap())
    }

    /// True when the server has closed the connection (a read sees end of stream or a reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Checks the greeting and sends the client flags.
    pub fn greet(&mut self, client_flags: u32) {
        assert_eq!(&self.read_bytes(8), b"NBDMAGIC");
        assert_eq!(&self.read_bytes(8), b"IHAVEOPT");
        let flags = self.u16();
        assert_eq!(flags & 1, 1, "FIXED_NEWSTYLE");
        assert_eq!(flags & 2, 2, "NO_ZEROES");
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), 0x0003_e889_0455_65a9, "option reply magic");
        let option = self.u32();
        let reply = self.u32();
        let len = self.u32() as usize;
        (option, reply, self.read_bytes(len))
    }

    /// The data of NBD_OPT_INFO / NBD_OPT_GO.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends NBD_OPT_INFO (6) or NBD_OPT_GO (7) asking for the block size, name and
    /// description; returns the infos (type, payload after the type) and the final reply.
    pub fn info(&mut self, option: u32, name: &str) -> (Vec<(u16, Vec<u8>)>, u32) {
        self.send_option(option, &Self::info_data(name, &[3, 1, 2]));
        let mut infos = Vec::new();
        loop {
            let (opt, reply, data) = self.opt_reply();
            assert_eq!(opt, option);
            if reply != 3 {
                return (infos, reply);
            }
            let t = u16::from_be_bytes([data[0], data[1]]);
            infos.push((t, data[2..].to_vec()));
        }
    }

    /// NBD_OPT_GO; panics unless it succeeds.
    pub fn go(&mut self, name: &str) -> ExportInfo {
        let (infos, reply) = self.info(7, name);
        assert_eq!(reply, 1, "NBD_OPT_GO should end with NBD_REP_ACK");
        parse_infos(&infos)
    }

    pub fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.s
            .write_all(&request_bytes(cmd, flags, cookie, offset, len))
            .unwrap();
    }

    pub fn write_req(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut b = request_bytes(WRITE, flags, cookie, offset, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply: (error, cookie).
    pub fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), 0x6744_6698, "simple reply magic");
        let error = self.u32();
        (error, self.u64())
    }

    /// One request and its reply; the error value.
    pub fn call(&mut self, cmd: u16, flags: u16, offset: u64, len: u32) -> u32 {
        self.request(cmd, flags, 77, offset, len);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 77);
        error
    }

    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.write_req(flags, 78, offset, data);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 78);
        error
    }

    /// A read that must succeed.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(READ, 0, 79, offset, len);
        let (error, cookie) = self.reply();
        assert_eq!((error, cookie), (0, 79), "read of {len} at {offset}");
        self.read_bytes(len as usize)
    }
}

pub fn request_bytes(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

pub fn parse_infos(infos: &[(u16, Vec<u8>)]) -> ExportInfo {
    let mut e = ExportInfo::default();
    for (t, d) in infos {
        match t {
            0 => {
                assert_eq!(d.len(), 10, "NBD_INFO_EXPORT is 12 bytes");
                e.size = u64::from_be_bytes(d[0..8].try_into().unwrap());
                e.flags = u16::from_be_bytes(d[8..10].try_into().unwrap());
            }
            3 => {
                assert_eq!(d.len(), 12, "NBD_INFO_BLOCK_SIZE is 14 bytes");
                e.min_block = u32::from_be_bytes(d[0..4].try_into().unwrap());
                e.preferred_block = u32::from_be_bytes(d[4..8].try_into().unwrap());
                e.max_payload = u32::from_be_bytes(d[8..12].try_into().unwrap());
            }
            _ => {}
        }
    }
    e
}

/// A recognisable 4 KiB-aligned pattern for `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (tag as usize * 131 + i / 512 * 7 + i % 251) as u8)
        .collect()
}

/// Whether external tools are required (`REQUIRE_ORACLES=1`): then a missing one fails.
pub fn require_oracles() -> bool {
    std::env::var("REQUIRE_ORACLES").is_ok_and(|v| v == "1")
}

/// Whether `tool --version` runs; prints `SKIP` and returns false if not (panics instead
/// when oracles are required).
pub fn have_tool(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !require_oracles(),
            "{tool} is required (REQUIRE_ORACLES=1) but does not run"
        );
        println!("SKIP {tool} is not installed");
    }
    ok
}
