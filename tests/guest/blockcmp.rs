//! blockcmp: which reference each block of a device (or file) matches, for the guest suite.
//!
//!   blockcmp [--bs BYTES] [--offset BYTES] --len BYTES TARGET REF...
//!
//! Reads TARGET and every REF over the same byte range, block by block, and prints the runs
//! of blocks that match the same reference: `<ref> <first block> <count>`, where `<ref>` is
//! the 1-based index of the first REF whose block is equal, or 0 when none is. Blocks count
//! from the start of the range. Exit status: 0 when every block matches some REF, 1 when one
//! matches none, 2 on bad usage or a read error. Busybox's cmp only finds the first
//! difference; a snapshot taken under load, or a device after a daemon crash, needs each
//! block judged on its own.
//!
//! Built by tests/guest/run with plain rustc (std only, static) and put in the guest's /bin.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("blockcmp: {e}");
            ExitCode::from(2)
        }
    }
}

fn number(v: Option<String>, what: &str) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{what} needs a value"))?;
    let (digits, mult) = match v.chars().last() {
        Some('K') => (&v[..v.len() - 1], 1 << 10),
        Some('M') => (&v[..v.len() - 1], 1 << 20),
        Some('G') => (&v[..v.len() - 1], 1 << 30),
        _ => (&v[..], 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{what} {v}: {e}"))
}

fn run() -> Result<bool, String> {
    let mut bs = 4096u64;
    let mut offset = 0u64;
    let mut len = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bs" => bs = number(args.next(), "--bs")?,
            "--offset" => offset = number(args.next(), "--offset")?,
            "--len" => len = Some(number(args.next(), "--len")?),
            _ => paths.push(a),
        }
    }
    let len = len.ok_or("--len is required")?;
    if paths.len() < 2 || bs == 0 || len % bs != 0 {
        return Err(
            "usage: blockcmp [--bs N] [--offset N] --len N TARGET REF... \
                    (len a multiple of bs)"
                .into(),
        );
    }
    let mut files = Vec::new();
    for p in &paths {
        let mut f = File::open(p).map_err(|e| format!("{p}: {e}"))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| format!("{p}: {e}"))?;
        files.push(f);
    }
    let bs = usize::try_from(bs).map_err(|_| "--bs is too large")?;
    let mut bufs = vec![vec![0u8; bs]; files.len()];
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    let mut all_match = true;
    for block in 0..len / bs as u64 {
        for (f, (buf, p)) in files.iter_mut().zip(bufs.iter_mut().zip(&paths)) {
            f.read_exact(buf)
                .map_err(|e| format!("{p}: block {block}: {e}"))?;
        }
        let which = bufs[1..]
            .iter()
            .position(|r| r == &bufs[0])
            .map_or(0, |i| i + 1);
        all_match &= which != 0;
        match runs.last_mut() {
            Some((w, _, n)) if *w == which => *n += 1,
            _ => runs.push((which, block, 1)),
        }
    }
    for (which, first, n) in runs {
        println!("{which} {first} {n}");
    }
    Ok(all_match)
}
