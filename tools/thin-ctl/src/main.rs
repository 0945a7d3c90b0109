//! thin-ctl: pools, thins and snapshots of ublk-thin, their ublk devices, and offline metadata
//! tools. See docs/thin-ctl.md.

mod changes;
mod client;
mod daemon;
mod dirs;
mod engine;
mod ops;
mod proto;
mod sidecar;
mod size;

use anyhow::{bail, Context, Result};
use block_io::data::Prealloc;
use clap::{Args, Parser, Subcommand};
use dirs::Dirs;
use proto::Request;
use serde_json::Value;
use sidecar::PoolOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "thin-ctl",
    version,
    about = "Thin provisioning over ublk: pools, thins, snapshots, devices"
)]
struct Cli {
    /// Where pool sidecars live.
    #[arg(
        long,
        global = true,
        env = "THIN_CTL_STATE_DIR",
        default_value = "/var/lib/ublk-thin"
    )]
    state_dir: PathBuf,
    /// Where daemon sockets, pid files and logs live.
    #[arg(
        long,
        global = true,
        env = "THIN_CTL_RUN_DIR",
        default_value = "/run/ublk-thin"
    )]
    run_dir: PathBuf,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pools: create, import, start/stop the daemon, status, grow, trim.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Create a thin volume.
    Create {
        pool: String,
        thin: String,
        #[arg(long, value_parser = size::parse)]
        size: u64,
    },
    /// Snapshot a thin (writable; the origin may be in use).
    Snapshot {
        pool: String,
        origin: String,
        snap: String,
    },
    /// Delete a thin (not while exposed); its blocks are freed in the background.
    Delete { pool: String, thin: String },
    /// Set a thin's size (not while exposed).
    Resize {
        pool: String,
        thin: String,
        #[arg(long, value_parser = size::parse)]
        size: u64,
    },
    /// List a pool's thins.
    List {
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve a thin as /dev/ublkbN (prints the path).
    Expose {
        pool: String,
        thin: String,
        /// Queues, one thread each.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Requests in flight per queue (at most 1024).
        #[arg(long, default_value_t = 128)]
        depth: u16,
        /// Device number N of /dev/ublkbN (default: the driver picks).
        #[arg(long)]
        id: Option<u32>,
        /// Largest request (and per-tag buffer).
        #[arg(long, value_parser = size::parse, default_value = "512K")]
        io_buf: u64,
    },
    /// Serve a thin over NBD (prints its URI); needs the daemon.
    Export {
        pool: String,
        thin: String,
        /// unix:PATH, or tcp:HOST:PORT (loopback unless --allow-remote).
        #[arg(long)]
        nbd: String,
        /// Listen on a non-loopback address. NBD has no authentication: anyone who can
        /// reach the port can read and write the thin.
        #[arg(long)]
        allow_remote: bool,
    },
    /// Stop serving a thin over NBD (requests in flight finish first).
    Unexport { pool: String, thin: String },
    /// Stop serving a thin (requests in flight finish first).
    Unexpose { pool: String, thin: String },
    /// After the daemon died: restart it and reattach its devices (I/O resumes).
    Recover { pool: String },
    /// Write metadata as thin_dump's XML (to stdout, or -o FILE).
    Dump {
        metadata: PathBuf,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Dump the held metadata snapshot (thin_dump -m).
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// Devices only, no mappings.
        #[arg(long)]
        skip_mappings: bool,
        /// Only this thin id.
        #[arg(long)]
        dev_id: Option<u32>,
    },
    /// Write metadata from thin_dump's XML (like thin_restore).
    Restore {
        #[arg(short, long)]
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Size of the metadata file to create when OUTPUT does not exist.
        #[arg(long, value_parser = size::parse, default_value = "64M")]
        metadata_size: u64,
    },
    /// Check metadata offline (every problem found).
    Check {
        metadata: PathBuf,
        /// No progress bar, no report: only the exit status.
        #[arg(short, long)]
        quiet: bool,
        /// Skip the mapping trees (fast).
        #[arg(long)]
        skip_mappings: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Create a pool on metadata and data files or block devices.
    Create(CreateArgs),
    /// Adopt existing metadata (ours or the kernel's dm-thin) under a name.
    Import {
        name: String,
        #[arg(long)]
        metadata: PathBuf,
        #[arg(long)]
        data: PathBuf,
    },
    /// Start the pool's daemon.
    Start {
        name: String,
        /// Run in this process (logs to stderr) instead of in the background.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop the daemon: devices drain and go, the pool commits and closes.
    Stop { name: String },
    /// Pool status.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Grow the data or metadata space (a data or metadata file is extended).
    Grow {
        name: String,
        #[arg(long, value_parser = size::parse)]
        data_size: Option<u64>,
        #[arg(long, value_parser = size::parse)]
        metadata_size: Option<u64>,
    },
    /// Discard every free data block on the data device.
    Trim { name: String },
    /// Set the userspace transaction id (dm-thin's set_transaction_id message).
    SetTransactionId {
        name: String,
        #[arg(long)]
        current: u64,
        #[arg(long)]
        new: u64,
    },
    /// List pools.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    name: String,
    #[arg(long)]
    metadata: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Data size (a missing file is created, a smaller one extended); default: the device.
    #[arg(long, value_parser = size::parse)]
    data_size: Option<u64>,
    /// Metadata size; default: room for every block mapped twice over.
    #[arg(long, value_parser = size::parse)]
    metadata_size: Option<u64>,
    #[arg(long, value_parser = size::parse, default_value = "64K")]
    block_size: u64,
    /// Free space below which the pool raises its low-water-mark event.
    #[arg(long, value_parser = size::parse, default_value = "0")]
    low_water_mark: u64,
    /// Blocks kept zeroed ahead of need for partial first writes.
    #[arg(long, default_value_t = 64)]
    reserve_blocks: u64,
    /// Fail writes at once when data space runs out (default: queue them).
    #[arg(long)]
    error_if_no_space: bool,
    /// Seconds writes wait for space in queue mode.
    #[arg(long, default_value_t = 60)]
    no_space_timeout: u64,
    /// Do not pass discards down to the data device.
    #[arg(long)]
    no_discard_passdown: bool,
    /// How the reserve is zeroed: write zero buffers, or the device's zeroing primitive.
    #[arg(long, value_parser = ["write", "primitive"], default_value = "write")]
    zeroing: String,
    /// A new data file: none (sparse), allocate (fallocate), zero (write zeros).
    #[arg(long, value_parser = ["none", "allocate", "zero"], default_value = "allocate")]
    preallocate: String,
    /// Format over metadata that already holds a pool.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thin-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> Result<()> {
    let dirs = Dirs {
        state: cli.state_dir,
        run: cli.run_dir,
    };
    match cli.cmd {
        Cmd::Pool(p) => pool_cmd(&dirs, p, cli.verbose),
        Cmd::Create { pool, thin, size } => {
            let v = client::run(&dirs, &pool, &Request::Create { thin, size })?;
            println!(
                "created {} (id {}, {})",
                v["name"].as_str().unwrap_or("?"),
                v["id"],
                fmt_size(&v["size"])
            );
            Ok(())
        }
        Cmd::Snapshot { pool, origin, snap } => {
            let v = client::run(&dirs, &pool, &Request::Snapshot { origin, snap })?;
            println!(
                "snapshot {} (id {}) of {}",
                v["name"].as_str().unwrap_or("?"),
                v["id"],
                v["origin"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Cmd::Delete { pool, thin } => {
            client::run(&dirs, &pool, &Request::Delete { thin: thin.clone() })?;
            println!("deleted {thin}");
            Ok(())
        }
        Cmd::Resize { pool, thin, size } => {
            client::run(
                &dirs,
                &pool,
                &Request::Resize {
                    thin: thin.clone(),
                    size,
                },
            )?;
            println!("{thin}: {}", size::format(size));
            Ok(())
        }
        Cmd::List { pool, json } => {
            let v = client::run(&dirs, &pool, &Request::List)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_thins(&v);
            }
            Ok(())
        }
        Cmd::Expose {
            pool,
            thin,
            queues,
            depth,
            id,
            io_buf,
        } => {
            let io_buf = u32::try_from(io_buf).context("--io-buf is too large")?;
            let req = Request::Expose {
                thin,
                queues,
                depth,
                id,
                io_buf,
            };
            let v = daemon_request(&dirs, &pool, &req)?;
            println!("{}", v["device"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Unexpose { pool, thin } => {
            let v = daemon_request(&dirs, &pool, &Request::Unexpose { thin })?;
            println!("removed {}", v["device"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Export {
            pool,
            thin,
            nbd,
            allow_remote,
        } => {
            let req = Request::Export {
                thin,
                nbd,
                allow_remote,
            };
            let v = daemon_request(&dirs, &pool, &req)?;
            println!("{}", v["uri"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Unexport { pool, thin } => {
            let v = daemon_request(&dirs, &pool, &Request::Unexport { thin })?;
            println!("stopped {}", v["uri"].as_str().unwrap_or("?"));
            Ok(())
        }
        Cmd::Recover { pool } => {
            if client::request(&dirs, &pool, &Request::Ping)?.is_some() {
                bail!("pool {pool:?} is running: its devices are served");
            }
            let pid = daemon::spawn(&dirs, &pool, cli.verbose)?;
            let v = client::run(&dirs, &pool, &Request::List)?;
            println!("pool {pool} recovered (daemon pid {pid})");
            print_thins(&v);
            Ok(())
        }
        Cmd::Dump {
            metadata,
            output,
            metadata_snap,
            skip_mappings,
            dev_id,
        } => dump(
            &metadata,
            output.as_deref(),
            metadata_snap,
            skip_mappings,
            dev_id,
        ),
        Cmd::Restore {
            input,
            output,
            metadata_size,
        } => restore(&input, &output, metadata_size),
        Cmd::Check {
            metadata,
            quiet,
            skip_mappings,
        } => check(&metadata, quiet, skip_mappings),
    }
}

/// A request only a running daemon can serve.
fn daemon_request(dirs: &Dirs, pool: &str, req: &Request) -> Result<Value> {
    client::request(dirs, pool, req)?.with_context(|| {
        format!("pool {pool:?} is not running; start it with `thin-ctl pool start {pool}`")
    })
}

fn pool_cmd(dirs: &Dirs, cmd: PoolCmd, verbose: u8) -> Result<()> {
    match cmd {
        PoolCmd::Create(a) => {
            let options = PoolOptions {
                low_water_mark_blocks: a.low_water_mark / a.block_size,
                reserve_blocks: a.reserve_blocks,
                error_if_no_space: a.error_if_no_space,
                no_space_timeout_secs: a.no_space_timeout,
                discard_passdown: !a.no_discard_passdown,
                zeroing: a.zeroing.clone(),
            };
            let prealloc = match a.preallocate.as_str() {
                "none" => Prealloc::Sparse,
                "zero" => Prealloc::WriteZeroes,
                _ => Prealloc::Allocate,
            };
            let spec = engine::CreateSpec {
                name: a.name,
                metadata: a.metadata,
                data: a.data,
                data_size: a.data_size,
                metadata_size: a.metadata_size,
                block_size: a.block_size,
                prealloc,
                force: a.force,
                options,
            };
            let s = engine::create_pool(dirs, &spec)?;
            println!(
                "created pool {} (metadata {}, data {}, blocks of {})",
                s.name,
                s.metadata.display(),
                s.data.display(),
                size::format(s.block_size)
            );
            Ok(())
        }
        PoolCmd::Import {
            name,
            metadata,
            data,
        } => {
            let s = engine::import_pool(dirs, &name, &metadata, &data)?;
            println!("imported pool {} with {} thins", s.name, s.thins.len());
            for (n, t) in &s.thins {
                println!(
                    "  {n} (id {}){}",
                    t.id,
                    if t.size == 0 {
                        ": set its size with `thin-ctl resize`"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        PoolCmd::Start { name, foreground } => {
            if foreground {
                return daemon::run(dirs, &name);
            }
            let pid = daemon::spawn(dirs, &name, verbose)?;
            println!("pool {name} started (daemon pid {pid})");
            Ok(())
        }
        PoolCmd::Stop { name } => {
            let pid = dirs.daemon_pid(&name);
            daemon_request(dirs, &name, &Request::Stop)?;
            if let Some(pid) = pid {
                wait_exit(pid, Duration::from_secs(120))?;
            }
            println!("pool {name} stopped");
            Ok(())
        }
        PoolCmd::Status { name, json } => {
            let v = client::run(dirs, &name, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        PoolCmd::Grow {
            name,
            data_size,
            metadata_size,
        } => {
            let v = client::run(
                dirs,
                &name,
                &Request::Grow {
                    data_size,
                    metadata_size,
                },
            )?;
            println!(
                "pool {name}: {} data blocks, {} metadata blocks",
                v["data_blocks_total"], v["metadata_blocks_total"]
            );
            Ok(())
        }
        PoolCmd::Trim { name } => {
            let v = client::run(dirs, &name, &Request::Trim)?;
            println!("trimmed {} free blocks", v["blocks_trimmed"]);
            Ok(())
        }
        PoolCmd::SetTransactionId { name, current, new } => {
            client::run(dirs, &name, &Request::SetTransactionId { current, new })?;
            println!("transaction id {new}");
            Ok(())
        }
        PoolCmd::List { json } => {
            let names = sidecar::Sidecar::list(&dirs.state)?;
            let rows: Vec<Value> = names
                .iter()
                .map(|n| serde_json::json!({ "name": n, "daemon_pid": dirs.daemon_pid(n) }))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    let state = match r["daemon_pid"].as_i64() {
                        Some(pid) => format!("running (pid {pid})"),
                        None => "stopped".into(),
                    };
                    println!("{:<24} {state}", r["name"].as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
    }
}

fn wait_exit(pid: i32, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        if std::time::Instant::now() > deadline {
            bail!(
                "the daemon (pid {pid}) has not exited after {} s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn fmt_size(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".into(), size::format)
}

fn print_thins(v: &Value) {
    println!(
        "{:<20} {:>6} {:>10} {:>12}  DEVICE",
        "NAME", "ID", "SIZE", "MAPPED"
    );
    for t in v.as_array().into_iter().flatten() {
        println!(
            "{:<20} {:>6} {:>10} {:>12}  {}",
            t["name"].as_str().unwrap_or("?"),
            t["id"].to_string(),
            fmt_size(&t["size"]),
            t["mapped_blocks"].to_string(),
            t["device"].as_str().unwrap_or("-")
        );
    }
}

fn print_status(v: &Value) {
    let bs = v["block_size"].as_u64().unwrap_or(1);
    let total = v["data_blocks_total"].as_u64().unwrap_or(0);
    let used = v["data_blocks_used"].as_u64().unwrap_or(0);
    let mt = v["metadata_blocks_total"].as_u64().unwrap_or(0);
    let mu = v["metadata_blocks_used"].as_u64().unwrap_or(0);
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    println!("pool      {}", v["name"].as_str().unwrap_or("?"));
    println!(
        "mode      {}{}",
        v["mode"].as_str().unwrap_or("?"),
        v["mode_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "daemon    {}",
        v["daemon_pid"]
            .as_i64()
            .map_or("not running".to_string(), |p| format!("pid {p}"))
    );
    println!(
        "data      {} of {} used ({:.1}%), blocks of {}",
        size::format(used * bs),
        size::format(total * bs),
        pct(used, total),
        size::format(bs)
    );
    println!(
        "metadata  {} of {} used ({:.1}%)",
        size::format(mu * 4096),
        size::format(mt * 4096),
        pct(mu, mt)
    );
    println!(
        "reserve   {} of {} blocks zeroed",
        v["reserve_ready"], v["reserve_target"]
    );
    println!("txn id    {}", v["transaction_id"]);
    let s = &v["stats"];
    println!(
        "stats     reads {} writes {} discards {} flushes {} commits {} (p99 {} us) copies {} sync-zeroed {}",
        s["reads"], s["writes"], s["discards"], s["flushes"], s["commits"], s["commit_p99_us"], s["copies"], s["provisions_sync_zero"]
    );
    print_thins(&v["thins"]);
}

fn check(metadata: &std::path::Path, quiet: bool, skip_mappings: bool) -> Result<()> {
    use std::sync::Arc;
    let dev = block_io::FileMetaDevice::open(metadata)
        .with_context(|| format!("opening {}", metadata.display()))?;
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("checking {bar:40} {pos}/{len} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>> = bar.clone().map(|b| {
        Arc::new(move |done: u64, total: u64| {
            b.set_length(total);
            b.set_position(done);
        }) as Arc<dyn Fn(u64, u64) + Send + Sync>
    });
    let report = thin_metadata::check::check(
        &dev,
        &thin_metadata::check::CheckOptions {
            skip_mappings,
            progress,
        },
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !quiet {
        println!("{}", report.to_string().trim_end());
    }
    if !report.is_clean() {
        bail!("{}: the metadata is damaged", metadata.display());
    }
    Ok(())
}

fn dump(
    metadata: &std::path::Path,
    output: Option<&std::path::Path>,
    metadata_snap: bool,
    skip_mappings: bool,
    dev_id: Option<u32>,
) -> Result<()> {
    use std::io::Write;
    let dev = block_io::FileMetaDevice::open(metadata)
        .with_context(|| format!("opening {}", metadata.display()))?;
    let opts = thin_metadata::xml::DumpOptions {
        metadata_snap,
        skip_mappings,
        dev_id,
    };
    match output {
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            thin_metadata::xml::dump(&dev, &mut w, &opts)
                .with_context(|| format!("dumping {}", metadata.display()))?;
            w.flush()?;
        }
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let r = thin_metadata::xml::dump(&dev, &mut w, &opts)
                .map_err(anyhow::Error::from)
                .and_then(|()| w.flush().map_err(anyhow::Error::from));
            if let Err(e) = r {
                // Never leave half a document behind.
                drop(w);
                let _ = std::fs::remove_file(path);
                return Err(e.context(format!("dumping {}", metadata.display())));
            }
        }
    }
    Ok(())
}

fn restore(input: &std::path::Path, output: &std::path::Path, metadata_size: u64) -> Result<()> {
    use std::sync::Arc;
    let f = std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let created = !output.exists();
    let dev: Arc<dyn block_io::MetaDevice> = if created {
        Arc::new(
            block_io::FileMetaDevice::create(output, metadata_size / engine::META_BLOCK_BYTES)
                .with_context(|| format!("creating {}", output.display()))?,
        )
    } else {
        Arc::new(
            block_io::FileMetaDevice::open(output)
                .with_context(|| format!("opening {}", output.display()))?,
        )
    };
    let mut r = std::io::BufReader::new(f);
    match thin_metadata::xml::restore(&mut r, dev) {
        Ok(sum) => {
            println!(
                "restored {} devices, {} mappings ({} data blocks, {} shared) into {}",
                sum.nr_devices,
                sum.nr_mappings,
                sum.nr_data_blocks_used,
                sum.nr_shared_data_blocks,
                output.display()
            );
            for c in &sum.mapped_blocks_corrected {
                eprintln!(
                    "thin-ctl: warning: device {} said mapped_blocks={} but maps {}; corrected",
                    c.dev_id, c.stated, c.actual
                );
            }
            Ok(())
        }
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(output);
            }
            Err(anyhow::Error::from(e).context(format!("restoring {}", input.display())))
        }
    }
}
