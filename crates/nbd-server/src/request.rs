//! One NBD request: checked against the export (`check`), run through the thin (`run`), and
//! its failure turned into an NBD error value in one function (`nbd_error`).
//!
//! The errors follow the NBD spec's "Error values" section: a request with an unknown
//! command, an unknown or misplaced flag, a misaligned range, a read or write larger than the
//! advertised maximum payload, or a read/trim/cache past the end gets `EINVAL`; a write or
//! write-zeroes past the end gets `ENOSPC`; any change to a read-only export gets `EPERM`.
//! Nothing here panics on what a client sends.

use crate::proto::{self, Request};
use block_io::data::{DataDevice, IoBuf};
use thin_pool::{PoolError, Thin};

/// Bytes of the zero buffer a write-zeroes with `NO_HOLE` writes through, at most.
pub(crate) const MAX_ZERO_BUF_BYTES: u64 = 1 << 20;

/// What the export accepts: its size, alignment, payload limit, and whether it is writable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub size_bytes: u64,
    /// The minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    pub max_payload: u32,
    pub read_only: bool,
}

impl Shape {
    /// The transmission flags sent to clients. A flush commits the whole pool (or
    /// `fdatasync`s the shared data device when no mapping changed), and every connection
    /// reads the same metadata and data device with no cache of its own, so flush and FUA
    /// effects are visible on every connection when the reply is sent: multi-conn is safe.
    pub(crate) fn flags(&self) -> u16 {
        let mut f = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_TRIM
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= proto::FLAG_READ_ONLY;
        }
        f
    }

    /// The preferred block size: 4 KiB, or the minimum if that is larger.
    pub(crate) fn preferred_block(&self) -> u32 {
        self.min_block.max(4096)
    }
}

/// A request that passed `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    Trim {
        fua: bool,
    },
    WriteZeroes {
        fua: bool,
        no_hole: bool,
    },
    /// `NBD_CMD_CACHE`: a hint; nothing to do (not advertised, but some clients send it).
    Cache,
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
}

impl Op {
    /// Bytes of buffer the request holds while it runs (and while its reply waits).
    pub(crate) fn buffer_bytes(&self, len: u32) -> usize {
        match self {
            Op::Read | Op::Write { .. } => len as usize,
            Op::WriteZeroes { no_hole: true, .. } => {
                u64::from(len).min(MAX_ZERO_BUF_BYTES) as usize
            }
            _ => 0,
        }
    }
}

/// Checks a request (whose magic was right) against the export; the error is the NBD error
/// value to reply with.
pub(crate) fn check(req: &Request, shape: &Shape) -> Result<Op, u32> {
    use proto::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};
    let fua = req.flags & CMD_FLAG_FUA != 0;
    // FUA is valid on every command; NO_HOLE only on write-zeroes; nothing else was
    // negotiated.
    let allowed = match req.cmd {
        proto::CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(proto::EINVAL);
    }
    let op = match req.cmd {
        proto::CMD_READ => Op::Read,
        proto::CMD_WRITE => Op::Write { fua },
        proto::CMD_DISC => return Ok(Op::Disconnect),
        proto::CMD_FLUSH => {
            // Offset and length are reserved and must be zero.
            if req.offset != 0 || req.len != 0 {
                return Err(proto::EINVAL);
            }
            return Ok(Op::Flush);
        }
        proto::CMD_TRIM => Op::Trim { fua },
        proto::CMD_CACHE => Op::Cache,
        proto::CMD_WRITE_ZEROES => Op::WriteZeroes {
            fua,
            no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
        },
        _ => return Err(proto::EINVAL),
    };
    let writes = matches!(
        op,
        Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
    );
    if writes && shape.read_only {
        return Err(proto::EPERM);
    }
    if matches!(op, Op::Read | Op::Write { .. }) && req.len > shape.max_payload {
        return Err(proto::EINVAL);
    }
    let min = u64::from(shape.min_block);
    if !req.offset.is_multiple_of(min) || !u64::from(req.len).is_multiple_of(min) {
        return Err(proto::EINVAL);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= shape.size_bytes);
    if !in_range {
        return Err(match op {
            Op::Write { .. } | Op::WriteZeroes { .. } => proto::ENOSPC,
            _ => proto::EINVAL,
        });
    }
    Ok(op)
}

/// The NBD error value for a pool error (its errno, folded into the values the spec allows).
pub(crate) fn nbd_error(e: &PoolError) -> u32 {
    match e.errno() {
        libc::ENOSPC => proto::ENOSPC,
        libc::EINVAL => proto::EINVAL,
        libc::EPERM => proto::EPERM,
        libc::ESHUTDOWN => proto::ESHUTDOWN,
        _ => proto::EIO,
    }
}

/// Runs a checked request. `buf` is the request's buffer: the payload of a write, the
/// destination of a read, the zero buffer of a `NO_HOLE` write-zeroes. Returns the NBD error
/// value (0 for success) and, for a successful read, the data to send.
pub(crate) async fn run<D: DataDevice>(
    thin: &Thin,
    dev: &D,
    op: Op,
    offset: u64,
    len: u32,
    buf: Option<IoBuf>,
) -> (u32, Option<IoBuf>) {
    let len = u64::from(len);
    let res = match (op, buf) {
        // A zero-length request changes nothing (the spec leaves it unspecified; success
        // does the least harm), whatever its flags.
        (Op::Read | Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }, _) if len == 0 => {
            Ok(None)
        }
        (Op::Read, Some(buf)) => match thin.read(dev, offset, buf).await {
            (Ok(()), buf) => Ok(Some(buf)),
            (Err(e), _) => Err(e),
        },
        (Op::Write { fua }, Some(buf)) => thin.write(dev, offset, buf, fua).await.0.map(|()| None),
        (Op::Flush, _) => thin.flush(dev).await.map(|()| None),
        (Op::Trim { fua }, _) => match thin.discard(dev, offset, len).await {
            Ok(()) if fua => thin.flush(dev).await.map(|()| None),
            res => res.map(|()| None),
        },
        (Op::WriteZeroes { fua, no_hole }, buf) => {
            let res = match buf {
                Some(buf) if no_hole => {
                    thin.write_zeroes_keeping_blocks(dev, offset, len, buf)
                        .await
                        .0
                }
                _ => thin.write_zeroes(dev, offset, len).await,
            };
            match res {
                Ok(()) if fua => thin.flush(dev).await.map(|()| None),
                res => res.map(|()| None),
            }
        }
        (Op::Cache, _) => Ok(None),
        // The reader gives reads and writes their buffer and never runs a disconnect; if that
        // ever changed, the client gets an error rather than the server a panic.
        (Op::Read | Op::Write { .. } | Op::Disconnect, _) => {
            return (proto::EINVAL, None);
        }
    };
    match res {
        Ok(data) => (0, data),
        Err(e) => {
            tracing::debug!("NBD request on thin {} failed: {e}", thin.id());
            (nbd_error(&e), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        size_bytes: 1 << 20,
        min_block: 4096,
        max_payload: 1 << 16,
        read_only: false,
    };

    fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            magic: proto::REQUEST_MAGIC,
            flags,
            cmd,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn good_requests_pass() {
        assert_eq!(check(&req(0, 0, 0, 4096), &SHAPE), Ok(Op::Read));
        assert_eq!(
            check(&req(1, 1, (1 << 20) - 4096, 4096), &SHAPE),
            Ok(Op::Write { fua: true })
        );
        assert_eq!(check(&req(3, 0, 0, 0), &SHAPE), Ok(Op::Flush));
        assert_eq!(check(&req(3, 1, 0, 0), &SHAPE), Ok(Op::Flush));
        assert_eq!(
            check(&req(6, 2, 0, 1 << 20), &SHAPE),
            Ok(Op::WriteZeroes {
                fua: false,
                no_hole: true
            })
        );
        // Trim and write-zeroes may exceed the maximum payload: they carry none.
        assert_eq!(
            check(&req(4, 0, 0, 1 << 20), &SHAPE),
            Ok(Op::Trim { fua: false })
        );
        assert_eq!(check(&req(2, 0, 0, 0), &SHAPE), Ok(Op::Disconnect));
        assert_eq!(check(&req(5, 0, 0, 4096), &SHAPE), Ok(Op::Cache));
    }

    #[test]
    fn bad_requests_get_the_spec_errors() {
        use proto::{EINVAL, ENOSPC, EPERM};
        // Unknown command, unknown flag, NO_HOLE off write-zeroes, flush with a range.
        assert_eq!(check(&req(99, 0, 0, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(7, 0, 0, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(0, 1 << 5, 0, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(1, 2, 0, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(3, 0, 4096, 0), &SHAPE), Err(EINVAL));
        // Misaligned, oversized.
        assert_eq!(check(&req(0, 0, 512, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(1, 0, 0, 100), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(0, 0, 0, 1 << 17), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(1, 0, 0, 1 << 17), &SHAPE), Err(EINVAL));
        // Past the end: reads and trims EINVAL, writes ENOSPC; an overflowing end too.
        assert_eq!(check(&req(0, 0, 1 << 20, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(4, 0, 1 << 20, 4096), &SHAPE), Err(EINVAL));
        assert_eq!(check(&req(1, 0, 1 << 20, 4096), &SHAPE), Err(ENOSPC));
        assert_eq!(check(&req(6, 0, 1 << 20, 4096), &SHAPE), Err(ENOSPC));
        assert_eq!(
            check(&req(0, 0, u64::MAX - 4095, 4096), &SHAPE),
            Err(EINVAL)
        );
        // Read-only.
        let ro = Shape {
            read_only: true,
            ..SHAPE
        };
        assert_eq!(check(&req(1, 0, 0, 4096), &ro), Err(EPERM));
        assert_eq!(check(&req(4, 0, 0, 4096), &ro), Err(EPERM));
        assert_eq!(check(&req(0, 0, 0, 4096), &ro), Ok(Op::Read));
        assert_ne!(ro.flags() & proto::FLAG_READ_ONLY, 0);
        assert_eq!(SHAPE.flags() & proto::FLAG_READ_ONLY, 0);
    }

    #[test]
    fn pool_errors_fold_into_nbd_values() {
        assert_eq!(nbd_error(&PoolError::NoDataSpace), proto::ENOSPC);
        assert_eq!(nbd_error(&PoolError::NoMetadataSpace), proto::ENOSPC);
        assert_eq!(nbd_error(&PoolError::Invalid("x".into())), proto::EINVAL);
        assert_eq!(nbd_error(&PoolError::ReadOnly("x".into())), proto::EIO);
        assert_eq!(nbd_error(&PoolError::ShuttingDown), proto::ESHUTDOWN);
        assert_eq!(nbd_error(&PoolError::UnknownThin(3)), proto::EIO);
    }
}
