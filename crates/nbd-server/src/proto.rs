//! The NBD wire format: magic numbers, flags, option and command codes, and the few fixed
//! layouts this server reads and writes (the spec is `doc/proto.md` of the NBD project).
//!
//! Everything on the wire is big-endian (network byte order), the one place in ublk-thin
//! where integers are not little-endian; the workspace lint against big-endian conversions
//! is lifted for this module only. Decoding is of fixed-size arrays, so nothing here can
//! read out of bounds or panic on what a client sends.

#![allow(
    clippy::big_endian_bytes,
    reason = "NBD integers are big-endian on the wire"
)]

/// "NBDMAGIC", the first thing the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of a fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Error values of replies (the spec's fixed set, Linux numbering).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of a transmission request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// The server's first message.
pub fn greeting() -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The client flags, the client's first message.
pub fn client_flags(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_BYTES]) -> OptionHeader {
        let [m0, m1, m2, m3, m4, m5, m6, m7, o0, o1, o2, o3, l0, l1, l2, l3] = *b;
        OptionHeader {
            magic: u64::from_be_bytes([m0, m1, m2, m3, m4, m5, m6, m7]),
            option: u32::from_be_bytes([o0, o1, o2, o3]),
            len: u32::from_be_bytes([l0, l1, l2, l3]),
        }
    }
}

/// An option reply: its 20-byte header followed by `payload`.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The payload of `NBD_INFO_EXPORT`.
pub fn info_export(size_bytes: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size_bytes.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// The payload of `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// The payload of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: the type, then the string.
pub fn info_string(info: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// The payload of `NBD_REP_SERVER`: the name's length, then the name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// What ends option haggling after `NBD_OPT_EXPORT_NAME`: size, flags and, unless the client
/// asked for none, 124 zero bytes.
pub fn export_name_reply(size_bytes: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size_bytes.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(b.len() + 124, 0);
    }
    b
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data; `None` if it is malformed (lengths that disagree with the
    /// option's length, or a name that is not UTF-8).
    pub fn decode(data: &[u8]) -> Option<InfoRequest> {
        let (len, rest) = data.split_first_chunk::<4>()?;
        let name_len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if name_len > rest.len() {
            return None;
        }
        let (name, rest) = rest.split_at(name_len);
        let (n, rest) = rest.split_first_chunk::<2>()?;
        let n = usize::from(u16::from_be_bytes(*n));
        if rest.len() != n * 2 {
            return None;
        }
        let infos = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some(InfoRequest {
            name: String::from_utf8(name.to_vec()).ok()?,
            infos,
        })
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn decode(b: &[u8; REQUEST_BYTES]) -> Request {
        let (magic, rest) = split::<4>(b);
        let (flags, rest) = split::<2>(rest);
        let (cmd, rest) = split::<2>(rest);
        let (cookie, rest) = split::<8>(rest);
        let (offset, rest) = split::<8>(rest);
        let (len, _) = split::<4>(rest);
        Request {
            magic: u32::from_be_bytes(magic),
            flags: u16::from_be_bytes(flags),
            cmd: u16::from_be_bytes(cmd),
            cookie: u64::from_be_bytes(cookie),
            offset: u64::from_be_bytes(offset),
            len: u32::from_be_bytes(len),
        }
    }

    /// The wire form (the unit tests' round trip).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Splits `N` bytes off the front of a slice known to hold at least that many (the callers'
/// fixed-size arrays); a short slice yields zeros rather than a panic.
fn split<const N: usize>(b: &[u8]) -> ([u8; N], &[u8]) {
    match b.split_first_chunk::<N>() {
        Some((head, rest)) => (*head, rest),
        None => ([0; N], &[]),
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), r);
    }

    #[test]
    fn greeting_and_replies_are_big_endian() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
        let r = simple_reply(EINVAL, 7);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &[0, 0, 0, 22]);
        assert_eq!(r[15], 7);
        let o = option_reply(OPT_GO, REP_ERR_UNSUP, b"x");
        assert_eq!(o.len(), 21);
        assert_eq!(&o[12..16], &[0x80, 0, 0, 1]);
        assert_eq!(&o[16..20], &[0, 0, 0, 1]);
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
    }

    #[test]
    fn info_requests_decode_strictly() {
        let mut d = vec![0, 0, 0, 2];
        d.extend_from_slice(b"ab");
        d.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        assert_eq!(
            InfoRequest::decode(&d),
            Some(InfoRequest {
                name: "ab".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // A name longer than the data, a count that disagrees, a trailing byte, too short.
        assert_eq!(InfoRequest::decode(&[0, 0, 0, 9, b'a', 0, 0]), None);
        assert_eq!(InfoRequest::decode(&[0, 0, 0, 0, 0, 2, 0, 3]), None);
        assert_eq!(InfoRequest::decode(&[0, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(InfoRequest::decode(&[0, 0]), None);
        assert_eq!(InfoRequest::decode(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 0]),
            Some(InfoRequest {
                name: String::new(),
                infos: vec![]
            })
        );
    }
}
