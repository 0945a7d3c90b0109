//! The synchronous fallback takes over, with exactly one warning line that says why and how to
//! fix it, when io_uring cannot be set up; and files move freely between engines.
//!
//! Setup failures are forced with `RingConfig::fail_setup_with`, a per-device option, so these
//! tests share no global state and can run in parallel with the real-ring tests.

mod data_common;

use block_io::data::rt::{block_on, RingConfig};
use block_io::data::{
    AnyDataDevice, DataBlock, DataDevice, DataDeviceOptions, DirectIo, EngineChoice, EngineKind,
    IoBuf, Prealloc,
};
use data_common::{scratch, BLOCK_SIZE, NR_BLOCKS};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

fn options_capturing(errno: Option<i32>) -> (DataDeviceOptions, Rc<RefCell<Vec<String>>>) {
    let lines = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&lines);
    let opts = DataDeviceOptions::new(BLOCK_SIZE)
        .direct(DirectIo::Auto)
        .ring(RingConfig {
            fail_setup_with: errno,
            ..RingConfig::default()
        })
        .on_warning(move |line| sink.borrow_mut().push(line.to_string()));
    (opts, lines)
}

fn create(opts: DataDeviceOptions, path: &Path) -> AnyDataDevice {
    opts.create(path, NR_BLOCKS, Prealloc::Allocate)
        .expect("create data file")
}

#[test]
fn setup_failures_fall_back_with_one_warning() {
    let cases: [(i32, &str, &[&str]); 3] = [
        (libc::EPERM, "EPERM", &["io_uring", "sysctl", "seccomp"]),
        (libc::ENOSYS, "ENOSYS", &["CONFIG_IO_URING"]),
        (libc::ENOMEM, "ENOMEM", &["locked-memory", "ulimit -l"]),
    ];
    for (errno, name, hints) in cases {
        let file = scratch("fallback");
        let (opts, lines) = options_capturing(Some(errno));
        let dev = create(opts, &file.0);
        assert_eq!(dev.kind(), EngineKind::Sync, "{name}");
        let lines = lines.borrow();
        assert_eq!(
            lines.len(),
            1,
            "{name}: expected one warning line, got {lines:?}"
        );
        let line = &lines[0];
        eprintln!("{line}");
        assert!(
            !line.contains('\n'),
            "{name}: the warning must be one line: {line}"
        );
        assert!(line.starts_with("warning: "), "{line}");
        assert!(line.contains(name), "{name} not named: {line}");
        assert!(line.contains("falling back to synchronous I/O"), "{line}");
        assert!(line.contains("to fix:"), "no fix given: {line}");
        // EPERM names either the sysctl or the seccomp policy, depending on the host.
        let hinted = hints.iter().filter(|h| line.contains(*h)).count();
        assert!(hinted >= 1, "{name}: none of {hints:?} in: {line}");
        assert_eq!(dev.fallback_reason(), Some(line.as_str()));
        // And it works: the same semantics as io_uring.
        block_on(async {
            let (res, _) = dev
                .write(DataBlock(3), 4096, IoBuf::filled(8192, 0x33))
                .await;
            res.unwrap();
            dev.flush().await.unwrap();
            let (res, buf) = dev.read(DataBlock(3), 4096, IoBuf::new(8192)).await;
            res.unwrap();
            assert!(buf.iter().all(|&b| b == 0x33));
        });
    }
}

#[test]
fn uring_required_reports_the_setup_error() {
    let file = scratch("fallback-required");
    let (opts, lines) = options_capturing(Some(libc::EPERM));
    let err = opts
        .engine(EngineChoice::Uring)
        .create(&file.0, NR_BLOCKS, Prealloc::Allocate)
        .expect_err("io_uring was required");
    assert_eq!(block_io::os_error(&err), Some(libc::EPERM), "{err}");
    assert!(err.to_string().contains("EPERM"), "{err}");
    assert!(
        lines.borrow().is_empty(),
        "no fallback, so no fallback warning"
    );
}

#[test]
fn sync_by_choice_warns_nothing_and_real_ring_is_used_when_it_works() {
    let file = scratch("fallback-choice");
    let (opts, lines) = options_capturing(None);
    let dev = create(opts.engine(EngineChoice::Sync), &file.0);
    assert_eq!(dev.kind(), EngineKind::Sync);
    assert!(dev.fallback_reason().is_none());
    drop(dev);

    let file = scratch("fallback-auto");
    let (opts, auto_lines) = options_capturing(None);
    let dev = create(opts, &file.0);
    match dev.kind() {
        EngineKind::Uring => assert!(auto_lines.borrow().is_empty()),
        // A host without io_uring: the fallback is right, but say so visibly.
        _ => eprintln!("SKIP: io_uring unavailable here: {:?}", auto_lines.borrow()),
    }
    assert!(lines.borrow().is_empty());
}

#[test]
fn data_moves_between_engines() {
    let file = scratch("fallback-interop");
    let (opts, _) = options_capturing(Some(libc::ENOSYS));
    let sync = create(opts, &file.0);
    block_on(async {
        for block in 0..NR_BLOCKS {
            let (res, _) = sync
                .write(
                    DataBlock(block),
                    0,
                    IoBuf::filled(BLOCK_SIZE as usize, block as u8),
                )
                .await;
            res.unwrap();
        }
        sync.flush().await.unwrap();
    });
    drop(sync);
    let (opts, _) = options_capturing(None);
    let uring = opts.engine(EngineChoice::Auto).open(&file.0).unwrap();
    block_on(async {
        for block in 0..NR_BLOCKS {
            let (res, buf) = uring
                .read(DataBlock(block), 0, IoBuf::new(BLOCK_SIZE as usize))
                .await;
            res.unwrap();
            assert!(buf.iter().all(|&b| b == block as u8), "block {block}");
        }
    });
}

/// tmpfs has no O_DIRECT: `On` must say so clearly, `Auto` must warn and work buffered.
#[test]
fn no_o_direct_is_a_clear_error_or_a_warned_fallback() {
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        eprintln!("SKIP: no /dev/shm");
        return;
    }
    let path = dir.join(format!("block-io-nodirect-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let guard = data_common::Scratch(path.clone());
    let err = DataDeviceOptions::new(BLOCK_SIZE)
        .direct(DirectIo::On)
        .on_warning(|_| {})
        .create(&path, 4, Prealloc::Sparse)
        .err();
    let _ = std::fs::remove_file(&path);
    let Some(err) = err else {
        eprintln!("SKIP: /dev/shm supports O_DIRECT on this host");
        return;
    };
    assert!(err.to_string().contains("O_DIRECT"), "{err}");
    let (opts, lines) = options_capturing(None);
    let dev = opts
        .direct(DirectIo::Auto)
        .create(&path, 4, Prealloc::Sparse)
        .unwrap();
    assert_eq!(lines.borrow().len(), 1, "{:?}", lines.borrow());
    assert!(lines.borrow()[0].contains("O_DIRECT"));
    block_on(async {
        let (res, _) = dev.write(DataBlock(1), 0, IoBuf::filled(4096, 9)).await;
        res.unwrap();
        let (res, buf) = dev.read(DataBlock(1), 0, IoBuf::new(4096)).await;
        res.unwrap();
        assert!(buf.iter().all(|&b| b == 9));
    });
    drop(guard);
}
