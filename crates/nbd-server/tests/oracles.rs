//! Real NBD clients written by others against an export of a pool on temporary files:
//! fio's nbd engine (libnbd) with `--verify=crc32c` at iodepth 32, on a thin and on a
//! snapshot of it, and qemu-io/qemu-img (qemu's own NBD client) writing and reading patterns.
//! A missing tool prints `SKIP <reason>` unless `REQUIRE_ORACLES=1`, which makes it a failure.

mod common;

use block_io::data::rt;
use common::*;
use nbd_server::Export;
use std::process::Command;

const SIZE: u64 = 64 << 20;

/// Runs a command; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Whether this fio has the nbd engine.
fn fio_has_nbd() -> bool {
    if !have_tool("fio") {
        return false;
    }
    let ok = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("uri"));
    if !ok {
        assert!(
            !require_oracles(),
            "fio has no nbd engine (REQUIRE_ORACLES=1)"
        );
        println!("SKIP fio has no nbd engine");
    }
    ok
}

/// A fio job writing `size` of the export at iodepth 32 and verifying every block with
/// crc32c (`extra` adds options, e.g. the block sizes or `--verify_only`).
fn fio(export: &Export, dir: &TempDir, name: &str, extra: &[&str]) -> String {
    // fio leaves its verify state files in its working directory.
    let out = run(Command::new("fio")
        .current_dir(&dir.0)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", export.uri()))
        .args(["--rw=randwrite", "--iodepth=32", "--size=16m"])
        .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
        .args(extra));
    assert!(!out.contains("verify: bad"), "{out}");
    for line in out
        .lines()
        .filter(|l| l.contains("READ:") || l.contains("WRITE:"))
    {
        println!("fio {name}: {}", line.trim());
    }
    out
}

#[test]
fn fio_verifies_a_thin_and_a_snapshot_of_it() {
    if !fio_has_nbd() {
        return;
    }
    let rig = Rig::new("fio", 2048);
    let origin = rig.export(1, SIZE, "origin");
    // Mixed sizes up to 256 KiB on the thin; then 4 KiB ones.
    let mixed = ["--bssplit=4k/40:16k/20:64k/20:256k/20", "--randseed=11"];
    fio(&origin, &rig.dir, "mixed", &mixed);
    fio(
        &origin,
        &rig.dir,
        "small",
        &["--bs=4k", "--randseed=12", "--offset=32m"],
    );

    // A snapshot, exported beside the live origin; random 4 KiB writes into it break
    // sharing of blocks the origin wrote.
    rt::block_on(rig.pool.create_snap(2, 1)).expect("snapshot");
    let snap = rig.export(2, SIZE, "snap");
    fio(&snap, &rig.dir, "snap4k", &["--bs=4k", "--randseed=13"]);
    fio(
        &snap,
        &rig.dir,
        "snapmixed",
        &[
            "--bssplit=4k/50:64k/25:256k/25",
            "--randseed=14",
            "--offset=32m",
        ],
    );

    // The origin still holds exactly what it was given.
    fio(
        &origin,
        &rig.dir,
        "mixed",
        &[&mixed[..], &["--verify_only"]].concat(),
    );
    fio(
        &origin,
        &rig.dir,
        "small",
        &["--bs=4k", "--randseed=12", "--offset=32m", "--verify_only"],
    );
    assert_eq!(origin.stats().protocol_errors, 0);
    assert_eq!(origin.stats().error_replies, 0);
    assert_eq!(snap.stats().error_replies, 0);
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    if !have_tool("qemu-io") || !have_tool("qemu-img") {
        return;
    }
    let rig = Rig::new("qemu", 512);
    let export = rig.export(1, SIZE, "s");
    let uri = export.uri();
    let qemu_io = |cmds: &[&str]| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        let out = run(cmd.arg(&uri));
        assert!(!out.contains("failed"), "{out}");
        out
    };
    qemu_io(&[
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        // Across a pool block boundary, and with FUA.
        "write -P 0xcd 60k 8k",
        "write -f -P 0xef 1m 4k",
        "read -P 0xab 0 60k",
        "read -P 0xcd 60k 8k",
        "read -P 0 68k 60k",
        "read -P 0xef 1m 4k",
        // Unaligned: qemu reads, modifies and writes whole blocks of the advertised minimum.
        "write -P 0x77 1000 100",
        "read -P 0x77 1000 100",
        "read -P 0xab 0 1000",
        "read -P 0xab 1100 2996",
        // Write-zeroes: plain (NO_HOLE) and allowed to unmap; discard of a whole block.
        "write -P 0x11 128k 128k",
        "write -z 128k 8k",
        "write -z -u 192k 64k",
        "read -P 0 128k 8k",
        "read -P 0x11 136k 56k",
        "read -P 0 192k 64k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0xcd 64k 4k",
        // A large write, then concurrent small ones, and flushes.
        "write -P 0x5a 2m 1m",
        "aio_write -P 0x21 4m 4k",
        "aio_write -P 0x22 5m 4k",
        "aio_flush",
        "flush",
    ]);
    // A second client process sees it all.
    qemu_io(&[
        "read -P 0x5a 2m 1m",
        "read -P 0x21 4m 4k",
        "read -P 0x22 5m 4k",
        "read -P 0xef 1m 4k",
        "read -P 0 0 64k",
    ]);
    let info = run(Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(&uri));
    assert!(info.contains(&format!("({SIZE} bytes)")), "{info}");
    assert_eq!(export.stats().error_replies, 0);
}
