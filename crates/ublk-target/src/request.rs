//! One ublk request: decoded from its descriptor, run through the thin, and turned into the
//! completion value the driver wants (bytes done, or a negative errno).
//!
//! `completion` is the one place an error becomes an errno. Nothing here panics on what the
//! driver sends: an unknown op, an oversized length or an unaligned offset each get an errno,
//! because a request the daemon never completes hangs its submitter in D state.

use block_io::data::{DataDevice, IoBuf};
use libublk::sys;
use std::sync::atomic::{AtomicBool, Ordering};
use thin_pool::{PoolError, Thin};

/// What a request asks for, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    /// `UBLK_IO_F_FUA` on a write.
    pub fua: bool,
    /// `UBLK_IO_F_NOUNMAP` on write-zeroes: zero without deallocating.
    pub no_unmap: bool,
}

/// The operations a thin serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Anything else (zone ops, WRITE_SAME, future ops): `-EOPNOTSUPP`.
    Unsupported(u32),
}

/// Why a request failed before or after reaching the pool.
#[derive(Debug)]
pub(crate) enum Failure {
    Pool(PoolError),
    /// A request the device's parameters should have ruled out.
    Invalid,
    Unsupported,
    /// Acknowledged writes were lost with a daemon that died (see `handle`).
    LostWrites,
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure::Pool(e)
    }
}

/// The completion value of a request: `Ok(bytes)` as is, an error as a negative errno.
pub(crate) fn completion(res: Result<u64, Failure>) -> i32 {
    match res {
        // A read or write of at most `max_io_buf_bytes` (<= 32 MiB); others report 0.
        Ok(bytes) => i32::try_from(bytes).unwrap_or(-libc::EIO),
        Err(Failure::Pool(e)) => -e.errno(),
        Err(Failure::Invalid) => -libc::EINVAL,
        Err(Failure::Unsupported) => -libc::EOPNOTSUPP,
        Err(Failure::LostWrites) => -libc::EIO,
    }
}

impl Request {
    /// Decodes a descriptor (sectors are always 512 bytes in ublk).
    pub(crate) fn decode(iod: &sys::ublksrv_io_desc) -> Request {
        let code = iod.op_flags & 0xff;
        let op = match code {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            other => Op::Unsupported(other),
        };
        Request {
            op,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
            fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
            no_unmap: iod.op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
        }
    }
}

/// Runs `req` on `thin`. `buf` is the tag's buffer: the driver copied a write's data into it,
/// and copies a read's data out of it after completion. It comes back with its length set to
/// its capacity, whatever happened.
///
/// `lost_writes` set means writes this device acknowledged were lost (a daemon died before
/// committing them): the next flush reports EIO once, so the application hears of it.
pub(crate) async fn handle<D: DataDevice>(
    thin: &Thin,
    dev: &D,
    lost_writes: &AtomicBool,
    req: Request,
    mut buf: IoBuf,
) -> (i32, IoBuf) {
    let res = match req.op {
        Op::Read | Op::Write if req.len > buf.capacity() as u64 => Err(Failure::Invalid),
        Op::Read => {
            buf.set_len(req.len as usize);
            let (r, b) = thin.read(dev, req.offset, buf).await;
            buf = b;
            r.map(|()| req.len).map_err(Failure::from)
        }
        Op::Write => {
            buf.set_len(req.len as usize);
            let (r, b) = thin.write(dev, req.offset, buf, req.fua).await;
            buf = b;
            r.map(|()| req.len).map_err(Failure::from)
        }
        Op::Flush => match thin.flush(dev).await {
            Ok(()) if lost_writes.swap(false, Ordering::SeqCst) => {
                tracing::error!(
                    "thin {}: reporting EIO on a flush: writes acknowledged before the \
                     previous daemon died were never committed and are lost",
                    thin.id()
                );
                Err(Failure::LostWrites)
            }
            r => r.map(|()| 0).map_err(Failure::from),
        },
        Op::Discard => thin
            .discard(dev, req.offset, req.len)
            .await
            .map(|()| 0)
            .map_err(Failure::from),
        Op::WriteZeroes if req.no_unmap => {
            let (r, b) = thin
                .write_zeroes_keeping_blocks(dev, req.offset, req.len, buf)
                .await;
            buf = b;
            r.map(|()| 0).map_err(Failure::from)
        }
        Op::WriteZeroes => thin
            .write_zeroes(dev, req.offset, req.len)
            .await
            .map(|()| 0)
            .map_err(Failure::from),
        Op::Unsupported(_) => Err(Failure::Unsupported),
    };
    let cap = buf.capacity();
    buf.set_len(cap);
    (completion(res), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_io::data::{rt, DataGeometry, MemDataDevice};
    use block_io::MemMetaDevice;
    use std::sync::Arc;
    use thin_pool::{Pool, PoolConfig};

    const BS: u64 = 64 << 10;

    /// A pool of 16 blocks on memory devices with thin 1, and a tag-sized buffer.
    fn rig() -> (Pool, Arc<MemDataDevice>, IoBuf) {
        let data = Arc::new(MemDataDevice::new(DataGeometry::new(BS, 16, 4096).unwrap()));
        let d = data.clone();
        let cfg = PoolConfig {
            reserve_blocks: 0,
            ..PoolConfig::default()
        };
        let pool = Pool::format(Arc::new(MemMetaDevice::new(256)), 16, cfg, move || {
            Ok(d.clone())
        })
        .unwrap();
        pool.create_thin(1).unwrap();
        (pool, data, IoBuf::new(256 << 10))
    }

    fn req(op: Op, offset: u64, len: u64) -> Request {
        Request {
            op,
            offset,
            len,
            fua: false,
            no_unmap: false,
        }
    }

    #[test]
    fn requests_reach_the_thin_and_report_bytes_or_errnos() {
        let (pool, dev, mut buf) = rig();
        let thin = pool.open_thin(1).unwrap();
        let lost = AtomicBool::new(false);
        rt::block_on(async {
            // A write spanning two blocks, then a read of it.
            buf.set_len(8192);
            buf.fill(0xab);
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Write, BS - 4096, 8192), buf).await;
            assert_eq!(res, 8192);
            assert_eq!(b.len(), b.capacity(), "the buffer comes back whole");
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Read, BS - 4096, 8192), b).await;
            assert_eq!(res, 8192);
            assert!(b[..8192].iter().all(|&x| x == 0xab));
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Flush, 0, 0), b).await;
            assert_eq!(res, 0);
            // After a daemon died with uncommitted writes: one flush says EIO, then no more.
            lost.store(true, Ordering::SeqCst);
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Flush, 0, 0), b).await;
            assert_eq!(res, -libc::EIO);
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Flush, 0, 0), b).await;
            assert_eq!(res, 0);
            // Write-zeroes with NOUNMAP keeps the blocks; without, whole blocks go.
            let mapped = || {
                pool.status()
                    .thins
                    .iter()
                    .find(|t| t.id == 1)
                    .unwrap()
                    .mapped_blocks
            };
            assert_eq!(mapped(), 2);
            let nounmap = Request {
                no_unmap: true,
                ..req(Op::WriteZeroes, 0, 2 * BS)
            };
            let (res, b) = handle(&thin, &dev, &lost, nounmap, b).await;
            assert_eq!(res, 0);
            assert_eq!(mapped(), 2, "NOUNMAP deallocates nothing");
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Read, BS - 4096, 8192), b).await;
            assert_eq!(res, 8192);
            assert!(b[..8192].iter().all(|&x| x == 0));
            let (res, b) = handle(&thin, &dev, &lost, req(Op::WriteZeroes, 0, 2 * BS), b).await;
            assert_eq!(res, 0);
            assert_eq!(mapped(), 0);
            // Discard of a range with nothing mapped, then errors.
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Discard, 0, 4 * BS), b).await;
            assert_eq!(res, 0);
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Unsupported(4), 0, 4096), b).await;
            assert_eq!(res, -libc::EOPNOTSUPP);
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Read, 0, 1 << 20), b).await;
            assert_eq!(res, -libc::EINVAL, "longer than the tag buffer");
            let (res, b) = handle(&thin, &dev, &lost, req(Op::Write, 100, 4096), b).await;
            assert_eq!(res, -libc::EINVAL, "unaligned for the data device");
            drop(b);
        });
        drop(thin);
        pool.close().unwrap();
    }

    fn iod(op: u32, flags: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags: op | flags,
            nr_sectors: sectors,
            start_sector: sector,
            addr: 0,
        }
    }

    #[test]
    fn decodes_ops_flags_and_byte_ranges() {
        let r = Request::decode(&iod(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 8, 16));
        assert_eq!(
            r,
            Request {
                op: Op::Write,
                offset: 4096,
                len: 8192,
                fua: true,
                no_unmap: false
            }
        );
        let r = Request::decode(&iod(
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_F_NOUNMAP,
            0,
            1,
        ));
        assert_eq!((r.op, r.no_unmap, r.fua), (Op::WriteZeroes, true, false));
        assert_eq!(
            Request::decode(&iod(sys::UBLK_IO_OP_READ, 0, 0, 0)).op,
            Op::Read
        );
        assert_eq!(
            Request::decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, 0, 0)).op,
            Op::Flush
        );
        assert_eq!(
            Request::decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 0, 0)).op,
            Op::Discard
        );
        assert_eq!(Request::decode(&iod(4, 0, 0, 0)).op, Op::Unsupported(4));
    }

    #[test]
    fn every_failure_is_a_negative_errno() {
        assert_eq!(completion(Ok(4096)), 4096);
        assert_eq!(completion(Ok(0)), 0);
        assert_eq!(
            completion(Err(PoolError::NoDataSpace.into())),
            -libc::ENOSPC
        );
        assert_eq!(
            completion(Err(PoolError::ReadOnly("x".into()).into())),
            -libc::EIO
        );
        assert_eq!(completion(Err(Failure::Invalid)), -libc::EINVAL);
        assert_eq!(completion(Err(Failure::Unsupported)), -libc::EOPNOTSUPP);
        // Too large to report as bytes: an error, never a wrapped positive value.
        assert_eq!(completion(Ok(1 << 40)), -libc::EIO);
    }
}
