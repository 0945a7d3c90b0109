//! The NBD protocol against a hand-written client: the handshake's options, every command,
//! concurrency with replies out of order, malformed requests and what they get, and that one
//! client's misbehaviour never stops the others being served.

#![allow(clippy::big_endian_bytes, reason = "NBD is big-endian on the wire")]

mod common;

use common::*;
use nbd_server::{Export, ExportConfig, ExportError, Listen};
use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;
const MAX_PAYLOAD: u32 = 32 << 20;

#[test]
fn the_handshake_answers_each_option() {
    let rig = Rig::new("handshake", 256);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    let mut c = Client::connect(&sock);
    c.greet(3);

    // NBD_OPT_LIST: our one export, then an ACK; with data it is invalid.
    c.send_option(3, &[]);
    let (opt, reply, data) = c.opt_reply();
    assert_eq!((opt, reply), (3, 2), "NBD_REP_SERVER");
    assert_eq!(data, [&[0, 0, 0, 3][..], b"vol"].concat());
    assert_eq!(c.opt_reply().1, 1, "NBD_REP_ACK");
    c.send_option(3, b"x");
    assert_eq!(c.opt_reply().1, 0x8000_0003, "NBD_REP_ERR_INVALID");

    // Structured replies, metadata contexts, TLS and unknown options: NBD_REP_ERR_UNSUP,
    // with their data consumed.
    for (opt, data) in [
        (8u32, &b""[..]),
        (10, b"abc"),
        (5, b""),
        (4321, b"0123456789"),
    ] {
        c.send_option(opt, data);
        let (o, reply, _) = c.opt_reply();
        assert_eq!((o, reply), (opt, 0x8000_0001), "option {opt}");
    }

    // NBD_OPT_INFO: an unknown export, malformed data, then the real one.
    let (infos, reply) = c.info(6, "nope");
    assert!(infos.is_empty());
    assert_eq!(reply, 0x8000_0006, "NBD_REP_ERR_UNKNOWN");
    c.send_option(6, &[0, 0, 0, 9, b'v']);
    assert_eq!(c.opt_reply().1, 0x8000_0003);
    let (infos, reply) = c.info(6, "vol");
    assert_eq!(reply, 1);
    let info = parse_infos(&infos);
    assert_eq!(info.size, SIZE);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN; not
    // read-only.
    assert_eq!(info.flags, 1 | 4 | 8 | 32 | 64 | 256, "{:#x}", info.flags);
    assert!(info.min_block.is_power_of_two() && (512..=4096).contains(&info.min_block));
    assert_eq!(info.preferred_block, 4096);
    assert_eq!(info.max_payload, MAX_PAYLOAD);
    let name = infos.iter().find(|(t, _)| *t == 1).expect("NBD_INFO_NAME");
    assert_eq!(name.1, b"vol");
    let desc = infos
        .iter()
        .find(|(t, _)| *t == 2)
        .expect("NBD_INFO_DESCRIPTION");
    assert_eq!(desc.1, b"ublk-thin thin 1");

    // NBD_OPT_GO on the default export enters transmission.
    let info = c.go("");
    assert_eq!(info.size, SIZE);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    c.request(DISC, 0, 1, 0, 0);
    assert!(c.closed_by_server());
    export.stop();
}

#[test]
fn export_name_and_abort_end_the_haggling() {
    let rig = Rig::new("export-name", 256);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    for no_zeroes in [false, true] {
        let mut c = Client::connect(&sock);
        c.greet(if no_zeroes { 3 } else { 1 });
        c.send_option(1, b"vol");
        assert_eq!(c.u64(), SIZE);
        assert_eq!(c.u16() & 1, 1);
        if !no_zeroes {
            assert_eq!(c.read_bytes(124), vec![0u8; 124]);
        }
        // The next bytes are a reply to a request, so the framing is right.
        assert_eq!(c.write(0, 0, &pattern(1, 4096)), 0);
        assert_eq!(c.read(0, 4096), pattern(1, 4096));
    }
    // EXPORT_NAME of an unknown export cannot be answered with an error: the server hangs up.
    let mut c = Client::connect(&sock);
    c.greet(1);
    c.send_option(1, b"nope");
    assert!(c.closed_by_server());
    // ABORT: an ACK, then the close.
    let mut c = Client::connect(&sock);
    c.greet(1);
    c.send_option(2, &[]);
    assert_eq!(c.opt_reply().1, 1);
    assert!(c.closed_by_server());
}

#[test]
fn every_command_does_what_it_says() {
    let rig = Rig::new("commands", 256);
    let export = rig.export(1, SIZE, "s");
    let (mut c, info) = Client::open(&socket_of(&export), "vol");
    let bs = BLOCK_BYTES;
    assert_eq!(info.size, SIZE);

    // Write, FUA write, read back; a write crossing a pool block boundary.
    assert_eq!(c.write(0, 0, &pattern(1, 8192)), 0);
    assert_eq!(c.write(FUA, 5 * bs, &pattern(2, 4096)), 0);
    assert_eq!(c.write(0, bs - 4096, &pattern(3, 8192)), 0);
    assert_eq!(c.read(0, 4096), pattern(1, 4096));
    assert_eq!(c.read(5 * bs, 4096), pattern(2, 4096));
    assert_eq!(c.read(bs - 4096, 8192), pattern(3, 8192));
    assert_eq!(c.call(FLUSH, 0, 0, 0), 0);

    // Trim of a whole block unmaps it: it reads as zeros.
    assert_eq!(c.call(TRIM, 0, 5 * bs, bs as u32), 0);
    assert_eq!(c.read(5 * bs, 4096), vec![0u8; 4096]);
    // Trim with FUA, of a partial block: allowed, and a hint only.
    assert_eq!(c.call(TRIM, FUA, 0, 4096), 0);

    // Write-zeroes, with and without NO_HOLE, over written data.
    assert_eq!(c.write(0, 2 * bs, &pattern(4, bs as usize)), 0);
    assert_eq!(c.write(0, 3 * bs, &pattern(5, bs as usize)), 0);
    assert_eq!(c.call(WRITE_ZEROES, NO_HOLE, 2 * bs + 4096, 8192), 0);
    assert_eq!(c.call(WRITE_ZEROES, FUA, 3 * bs, bs as u32), 0);
    let mut want = pattern(4, bs as usize);
    want[4096..12288].fill(0);
    assert_eq!(c.read(2 * bs, bs as u32), want);
    assert_eq!(c.read(3 * bs, bs as u32), vec![0u8; bs as usize]);
    // NO_HOLE kept block 2 provisioned; the plain write-zeroes unmapped block 3.
    let mapped = rig.pool.status().thins[0].mapped_blocks;
    assert!(mapped >= 2, "{mapped} blocks mapped");

    // Cache is a no-op; zero-length requests succeed and a read of 0 carries no data.
    assert_eq!(c.call(CACHE, 0, 0, 4096), 0);
    assert_eq!(c.call(READ, 0, 0, 0), 0);
    assert_eq!(c.call(TRIM, 0, 0, 0), 0);

    // A large write and read (1 MiB, sixteen pool blocks).
    let big = pattern(6, 1 << 20);
    assert_eq!(c.write(0, 16 * bs, &big), 0);
    assert_eq!(c.read(16 * bs, 1 << 20), big);

    c.request(DISC, 0, 9, 0, 0);
    assert!(c.closed_by_server());
}

#[test]
fn pipelined_requests_are_all_answered_by_cookie() {
    let rig = Rig::new("pipeline", 512);
    let export = rig.export(1, SIZE, "s");
    let (mut c, _) = Client::open(&socket_of(&export), "vol");
    const N: u64 = 200;
    // Writes of mixed sizes at scattered offsets, all sent before any reply is read, more
    // than one connection's in-flight limit holds at once.
    let place = |i: u64| (i * 37 % 400) * 16384;
    let len = |i: u64| 4096 * (1 + i % 4) as usize;
    for i in 0..N {
        c.write_req(
            if i % 7 == 0 { FUA } else { 0 },
            1000 + i,
            place(i),
            &pattern(i, len(i)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0, "write {cookie}");
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen.len() as u64, N);
    // Reads, pipelined too; each reply's data is matched by cookie.
    for i in 0..N {
        c.request(READ, 0, 5000 + i, place(i), len(i) as u32);
    }
    let mut got = HashMap::new();
    for _ in 0..N {
        let (error, cookie) = c.reply();
        assert_eq!(error, 0);
        let i = cookie - 5000;
        got.insert(i, c.read_bytes(len(i)));
    }
    for i in 0..N {
        // Later writes win where ranges overlap: check only offsets no later write touched.
        let overlapped = (i + 1..N)
            .any(|j| place(j) < place(i) + len(i) as u64 && place(i) < place(j) + len(j) as u64);
        if !overlapped {
            assert_eq!(got[&i], pattern(i, len(i)), "read {i}");
        }
    }
}

#[test]
fn several_connections_are_served_at_once() {
    let rig = Rig::new("many", 512);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    let clients: Vec<_> = (0..6u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let (mut c, _) = Client::open(&sock, "vol");
                // Each client its own 4 MiB, interleaved 64 KiB blocks with the others'.
                let at = |i: u64| (i * 6 + t) * BLOCK_BYTES + (i % 16) * 4096;
                for round in 0..4u64 {
                    for i in 0..32 {
                        let tag = t * 1000 + round * 100 + i;
                        c.write_req(0, i, at(i), &pattern(tag, 4096));
                    }
                    for _ in 0..32 {
                        assert_eq!(c.reply().0, 0);
                    }
                    for i in 0..32 {
                        c.request(READ, 0, i, at(i), 4096);
                    }
                    for _ in 0..32 {
                        let (error, i) = c.reply();
                        assert_eq!(error, 0);
                        let tag = t * 1000 + round * 100 + i;
                        assert_eq!(c.read_bytes(4096), pattern(tag, 4096), "client {t}");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    assert_eq!(export.stats().connections_accepted, 6);
    assert_eq!(export.stats().error_replies, 0);
}

#[test]
fn malformed_requests_get_errors_and_other_clients_keep_being_served() {
    let rig = Rig::new("malformed", 256);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    let (mut a, info) = Client::open(&sock, "vol");
    let (mut b, _) = Client::open(&sock, "vol");
    let min = u64::from(info.min_block);

    // Out of range: a read or trim past the end is EINVAL, a write or write-zeroes ENOSPC.
    assert_eq!(a.call(READ, 0, SIZE, 4096), EINVAL);
    assert_eq!(a.call(READ, 0, SIZE - 4096, 8192), EINVAL);
    assert_eq!(a.call(READ, 0, u64::MAX - 4095, 4096), EINVAL);
    assert_eq!(a.call(TRIM, 0, SIZE, 4096), EINVAL);
    assert_eq!(a.call(WRITE_ZEROES, 0, SIZE - 4096, 8192), ENOSPC);
    // A refused write's payload is consumed: the next request is framed right.
    assert_eq!(a.write(0, SIZE, &pattern(1, 4096)), ENOSPC);
    // Oversized: a read or write above the maximum payload.
    assert_eq!(a.call(READ, 0, 0, MAX_PAYLOAD + 4096), EINVAL);
    assert_eq!(
        a.write(0, 0, &vec![7u8; MAX_PAYLOAD as usize + 4096]),
        EINVAL
    );
    // Unknown commands (block status was not negotiated either), misaligned requests,
    // unknown or misplaced flags, a flush with a range.
    assert_eq!(a.call(42, 0, 0, 4096), EINVAL);
    assert_eq!(a.call(7, 0, 0, 4096), EINVAL);
    assert_eq!(a.call(READ, 0, min / 2, 4096), EINVAL);
    assert_eq!(a.write(0, 0, &pattern(1, min as usize / 2)), EINVAL);
    assert_eq!(a.call(READ, 1 << 9, 0, 4096), EINVAL);
    assert_eq!(a.call(READ, NO_HOLE, 0, 4096), EINVAL);
    assert_eq!(a.call(FLUSH, 0, 4096, 0), EINVAL);
    // None of that changed anything or broke the stream.
    assert_eq!(a.read(0, 4096), vec![0u8; 4096]);
    let before = export.stats();
    assert!(before.error_replies >= 15, "{before:?}");

    // A bad magic cannot be framed: that connection closes, and only that one.
    a.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap();
    a.s.write_all(&[0u8; 24]).unwrap();
    assert!(a.closed_by_server());
    assert_eq!(b.write(0, 8192, &pattern(2, 4096)), 0);
    assert_eq!(b.read(8192, 4096), pattern(2, 4096));
    let (mut c, _) = Client::open(&sock, "vol");
    assert_eq!(c.read(8192, 4096), pattern(2, 4096));
    assert_eq!(export.stats().protocol_errors, 1);

    // Handshake violations close the connection too, and still nobody else is affected.
    let mut d = Client::connect(&sock);
    d.greet(1 << 7);
    assert!(d.closed_by_server(), "unknown client flags");
    let mut d = Client::connect(&sock);
    d.greet(1);
    d.s.write_all(b"NOTAMAGI\0\0\0\x07\0\0\0\0").unwrap();
    assert!(d.closed_by_server(), "bad option magic");
    let mut d = Client::connect(&sock);
    d.greet(1);
    d.s.write_all(&[1, 2, 3]).unwrap();
    drop(d); // a half-sent option, then gone
    assert_eq!(c.read(8192, 4096), pattern(2, 4096));
    assert_eq!(b.read(8192, 4096), pattern(2, 4096));
    export.stop();
}

#[test]
fn a_client_gone_mid_request_leaves_acknowledged_writes_in_place() {
    let rig = Rig::new("gone", 256);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    let (mut a, _) = Client::open(&sock, "vol");
    for i in 0..8 {
        assert_eq!(a.write(FUA, i * BLOCK_BYTES, &pattern(i, 4096)), 0);
    }
    // Several writes in flight, then a header with half its payload, then the socket closes.
    for i in 8..16 {
        a.write_req(0, i, i * BLOCK_BYTES, &pattern(i, 4096));
    }
    let mut half = request_bytes(WRITE, 0, 99, 0, 8192).to_vec();
    half.extend_from_slice(&[0xff; 4096]);
    a.s.write_all(&half).unwrap();
    drop(a);
    let (mut b, _) = Client::open(&sock, "vol");
    for i in 0..8 {
        assert_eq!(b.read(i * BLOCK_BYTES, 4096), pattern(i, 4096), "block {i}");
    }
    // The half-sent write never ran.
    assert_eq!(b.read(0, 4096), pattern(0, 4096));
    // The connection's thread has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    while export.stats().nr_connections > 1 {
        assert!(Instant::now() < deadline, "{:?}", export.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_read_only_export_refuses_changes() {
    let rig = Rig::new("ro", 256);
    let mut cfg = rig.config(1, SIZE, "s");
    cfg.read_only = true;
    let export = Export::start(cfg).unwrap();
    let (mut c, info) = Client::open(&socket_of(&export), "vol");
    assert_eq!(info.flags & 2, 2, "NBD_FLAG_READ_ONLY");
    assert_eq!(c.write(0, 0, &pattern(1, 4096)), EPERM);
    assert_eq!(c.call(TRIM, 0, 0, 4096), EPERM);
    assert_eq!(c.call(WRITE_ZEROES, 0, 0, 4096), EPERM);
    assert_eq!(c.call(FLUSH, 0, 0, 0), 0);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
}

#[test]
fn tcp_is_loopback_only_unless_allowed() {
    let rig = Rig::new("tcp", 256);
    let tcp = |addr: &str| {
        let mut cfg = rig.config(1, SIZE, "unused");
        cfg.listen = addr.parse().unwrap();
        cfg
    };
    for addr in ["tcp:0.0.0.0:0", "tcp:[::]:0", "tcp:192.0.2.1:10809"] {
        match Export::start(tcp(addr)) {
            Err(e @ ExportError::RemoteRefused(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("no authentication"), "{msg}");
                assert!(msg.contains("--allow-remote"), "{msg}");
            }
            other => panic!("{addr}: {other:?}"),
        }
    }
    let export = Export::start(tcp("tcp:127.0.0.1:0")).unwrap();
    let Listen::Tcp(addr) = *export.listen() else {
        panic!("not tcp")
    };
    assert_ne!(addr.port(), 0);
    assert_eq!(export.uri(), format!("nbd://{addr}/vol"));
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client { s };
    c.greet(3);
    c.go("vol");
    assert_eq!(c.write(FUA, 4096, &pattern(3, 4096)), 0);
    assert_eq!(c.read(4096, 4096), pattern(3, 4096));
    // A second export on the same address is refused as in use.
    let mut cfg = tcp("tcp:127.0.0.1:0");
    cfg.listen = Listen::Tcp(addr);
    assert!(matches!(Export::start(cfg), Err(ExportError::InUse(_))));
    // With allow_remote, the wildcard address is served.
    let mut cfg = tcp("tcp:0.0.0.0:0");
    cfg.allow_remote = true;
    Export::start(cfg).unwrap().stop();
}

#[test]
fn connections_beyond_the_limit_are_closed_and_stop_drains() {
    let rig = Rig::new("limit", 256);
    let mut cfg = rig.config(1, SIZE, "s");
    cfg.max_connections = 1;
    let export = Export::start(cfg).unwrap();
    let sock = socket_of(&export);
    let (mut a, _) = Client::open(&sock, "vol");
    let mut b = Client::connect(&sock);
    assert!(b.closed_by_server(), "the second connection is refused");
    assert_eq!(export.stats().connections_refused, 1);
    // Requests sent before stop are all answered, then the connection closes.
    for i in 0..32 {
        a.write_req(0, i, i * 4096, &pattern(i, 4096));
    }
    let stopper = std::thread::spawn(move || export.stop());
    for _ in 0..32 {
        assert_eq!(a.reply().0, 0);
    }
    assert!(a.closed_by_server());
    stopper.join().unwrap();
    assert!(!sock.exists(), "the socket file is removed on stop");
    // The data is there for the next export.
    let export = rig.export(1, SIZE, "s2");
    let (mut c, _) = Client::open(&socket_of(&export), "vol");
    for i in 0..32 {
        assert_eq!(c.read(i * 4096, 4096), pattern(i, 4096));
    }
}

#[test]
fn stop_ends_idle_and_half_negotiated_connections() {
    let rig = Rig::new("stop-idle", 256);
    let export = rig.export(1, SIZE, "s");
    let sock = socket_of(&export);
    let (mut idle, _) = Client::open(&sock, "vol");
    let mut haggling = Client::connect(&sock);
    haggling.greet(1);
    let mut silent = Client::connect(&sock);
    // Connections still in the listen backlog at stop are never served: wait for all three
    // to be accepted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while export.stats().connections_accepted < 3 {
        assert!(Instant::now() < deadline, "{:?}", export.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    export.stop();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(idle.closed_by_server());
    assert!(haggling.closed_by_server());
    // The greeting was sent before the stop; then the close.
    assert_eq!(&silent.read_bytes(8), b"NBDMAGIC");
    silent.read_bytes(10);
    assert!(silent.closed_by_server());
}

#[test]
fn bad_configurations_are_refused() {
    let rig = Rig::new("config", 256);
    let check = |f: &dyn Fn(&mut ExportConfig)| {
        let mut cfg = rig.config(1, SIZE, "s");
        f(&mut cfg);
        Export::start(cfg).map(drop)
    };
    assert!(matches!(
        check(&|c| c.size_bytes = 1000),
        Err(ExportError::Invalid(_))
    ));
    assert!(matches!(
        check(&|c| c.size_bytes = 0),
        Err(ExportError::Invalid(_))
    ));
    assert!(matches!(
        check(&|c| c.thin_id = 9),
        Err(ExportError::Thin { .. })
    ));
    assert!(matches!(
        check(&|c| c.max_in_flight_bytes = 1 << 20),
        Err(ExportError::Invalid(_))
    ));
    // A live socket is not taken over; a stale one is.
    let live = rig.export(1, SIZE, "live");
    let e = check(&|c| c.listen = live.listen().clone());
    assert!(matches!(e, Err(ExportError::InUse(_))), "{e:?}");
    let stale = rig.dir.path("stale");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    check(&|c| c.listen = Listen::Unix(stale.clone())).unwrap();
    let file = rig.dir.path("file");
    std::fs::write(&file, b"x").unwrap();
    let e = check(&|c| c.listen = Listen::Unix(file.clone()));
    assert!(matches!(e, Err(ExportError::Listen { .. })), "{e:?}");
    assert!(file.exists(), "a file that is not a socket is left alone");
}

#[test]
fn without_io_uring_sockets_wait_on_a_reactor_thread() {
    // The ring setup fails as under a seccomp policy; the data device falls back too.
    let rig = Rig::new("fallback", 256);
    let d = rig.data.clone();
    let mut cfg = ExportConfig::new(
        rig.pool.clone(),
        1,
        SIZE,
        Listen::Unix(rig.dir.path("s")),
        move || {
            block_io::data::DataDeviceOptions::new(BLOCK_BYTES)
                .engine(block_io::data::EngineChoice::Sync)
                .open(&d)
        },
    );
    cfg.ring.fail_setup_with = Some(libc_eperm());
    let export = Export::start(cfg).unwrap();
    let (mut c, _) = Client::open(&socket_of(&export), "");
    for i in 0..64 {
        c.write_req(0, i, i * 8192, &pattern(i, 4096));
    }
    for _ in 0..64 {
        assert_eq!(c.reply().0, 0);
    }
    assert_eq!(c.call(FLUSH, 0, 0, 0), 0);
    for i in 0..64 {
        assert_eq!(c.read(i * 8192, 4096), pattern(i, 4096));
    }
}

fn libc_eperm() -> i32 {
    1
}
