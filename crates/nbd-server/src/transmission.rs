//! The transmission phase of one connection: a reader that takes requests off the socket and
//! spawns one task per request on the connection thread's executor, and a writer that sends
//! replies in whatever order requests finish, batching those ready together into one
//! `writev`.
//!
//! Invariants:
//! - Bounded: a request takes a permit (one of `max_in_flight`, plus the bytes of its buffer
//!   out of `max_in_flight_bytes`) before its payload is read or its buffer allocated, and
//!   holds it until its reply has been written; the reader waits for permits, so a client
//!   that sends faster than the pool serves, or reads no replies, is slowed, never given an
//!   error and never allowed to grow the server's memory.
//! - Nothing acknowledged is lost: a reply is queued only when its request has completed
//!   (a FUA write or a flush is durable by then). When the client goes away, or sends a bad
//!   magic, or the export stops, the reader stops, every request already read runs to
//!   completion, and only then does the connection end.
//! - The stream stays in step: a refused write's payload is read and dropped; a request
//!   whose magic is wrong cannot be framed at all, so the connection ends after draining.

use crate::proto::{self, Request, REQUEST_BYTES, SIMPLE_REPLY_BYTES};
use crate::request::{self, Op, Shape};
use crate::socket::{Reader, Socket};
use crate::Stats;
use async_executor::LocalExecutor;
use block_io::data::{DataDevice, IoBuf};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use thin_pool::Thin;

/// Replies sent in one `writev`, at most (two slices each: header and data).
const MAX_REPLIES_PER_WRITE: usize = 64;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
}

/// How the transmission phase ended.
#[derive(Debug)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its end (or the export stopped, which shuts our reading side).
    Closed,
    /// A request with a wrong magic: the stream cannot be followed any further.
    BadMagic(u32),
    /// The socket failed.
    Io(io::Error),
}

/// Counts requests and their buffer bytes in flight on one connection; one waiter at a time
/// (the reader, or at the end the drain).
struct Budget {
    limits: ConnLimits,
    nr: Cell<usize>,
    bytes: Cell<usize>,
    waiter: RefCell<Option<Waker>>,
}

impl Budget {
    fn new(limits: ConnLimits) -> Rc<Budget> {
        Rc::new(Budget {
            limits,
            nr: Cell::new(0),
            bytes: Cell::new(0),
            waiter: RefCell::new(None),
        })
    }

    /// Waits until a request of `bytes` fits. A request larger than the whole byte budget
    /// (not possible with a validated configuration) runs when nothing else does.
    async fn acquire(self: &Rc<Budget>, bytes: usize) -> Permit {
        poll_fn(|cx| {
            let (nr, used) = (self.nr.get(), self.bytes.get());
            let fits = nr == 0
                || (nr < self.limits.max_in_flight
                    && used.saturating_add(bytes) <= self.limits.max_in_flight_bytes);
            if fits {
                self.nr.set(nr + 1);
                self.bytes.set(used.saturating_add(bytes));
                Poll::Ready(Permit {
                    budget: self.clone(),
                    bytes,
                })
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until nothing is in flight.
    async fn drained(&self) {
        poll_fn(|cx| {
            if self.nr.get() == 0 {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// One request's share of the budget, released when its reply is written or dropped.
struct Permit {
    budget: Rc<Budget>,
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let b = &self.budget;
        b.nr.set(b.nr.get() - 1);
        b.bytes.set(b.bytes.get() - self.bytes);
        let waiter = b.waiter.borrow_mut().take();
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

/// A reply waiting to be sent.
struct Reply {
    header: [u8; SIMPLE_REPLY_BYTES],
    data: Option<IoBuf>,
    _permit: Permit,
}

impl Reply {
    fn len(&self) -> usize {
        SIMPLE_REPLY_BYTES + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// Replies ready to send, and the writer's state.
#[derive(Default)]
struct Replies {
    queue: RefCell<VecDeque<Reply>>,
    writer: RefCell<Option<Waker>>,
    /// The reader is done and every request has been answered: send the rest and stop.
    closed: Cell<bool>,
    /// Writing failed: replies are dropped as they come.
    failed: Cell<bool>,
}

impl Replies {
    fn push(&self, reply: Reply) {
        if self.failed.get() {
            return;
        }
        self.queue.borrow_mut().push_back(reply);
        self.wake_writer();
    }

    fn close(&self) {
        self.closed.set(true);
        self.wake_writer();
    }

    fn wake_writer(&self) {
        let waker = self.writer.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Takes the next batch, waiting for one; `None` once closed and empty.
    async fn next_batch(&self, batch: &mut Vec<Reply>) -> Option<()> {
        poll_fn(|cx| {
            let mut q = self.queue.borrow_mut();
            if q.is_empty() {
                if self.closed.get() {
                    return Poll::Ready(None);
                }
                *self.writer.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = q.len().min(MAX_REPLIES_PER_WRITE);
            batch.extend(q.drain(..n));
            Poll::Ready(Some(()))
        })
        .await
    }
}

/// Sends replies until the queue is closed and empty, or the socket fails.
async fn write_replies(sock: &Socket, replies: &Replies) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_REPLIES_PER_WRITE);
    while replies.next_batch(&mut batch).await.is_some() {
        if let Err(e) = write_batch(sock, &mut batch).await {
            replies.failed.set(true);
            batch.clear();
            replies.queue.borrow_mut().clear();
            return Err(e);
        }
    }
    Ok(())
}

/// Writes every reply of `batch` (emptying it), in as few `writev`s as the socket allows.
async fn write_batch(sock: &Socket, batch: &mut Vec<Reply>) -> io::Result<()> {
    // Bytes of batch[0] already sent.
    let mut sent = 0usize;
    let mut first = 0usize;
    while first < batch.len() {
        let n = {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * (batch.len() - first));
            let mut skip = sent;
            for r in &batch[first..] {
                let data: &[u8] = r.data.as_deref().unwrap_or_default();
                for part in [&r.header[..], data] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                }
            }
            sock.write_vectored(&slices).await?
        };
        sent += n;
        while first < batch.len() && sent >= batch[first].len() {
            sent -= batch[first].len();
            first += 1;
        }
    }
    // Dropping the replies releases their permits.
    batch.clear();
    Ok(())
}

/// Serves requests until the client disconnects, the stream breaks, or the export stops;
/// returns once every request read has been answered (or the socket failed).
pub(crate) async fn serve<D: DataDevice>(
    sock: &Socket,
    reader: &mut Reader,
    thin: &Thin,
    dev: &D,
    shape: &Shape,
    limits: ConnLimits,
    stats: &Stats,
) -> End {
    let budget = Budget::new(limits);
    let replies = Replies::default();
    let exe = LocalExecutor::new();
    let conn = Conn {
        thin,
        dev,
        shape,
        stats,
        budget: &budget,
        replies: &replies,
    };
    exe.run(async {
        let writer = exe.spawn(write_replies(sock, &replies));
        let end = conn.read_requests(&exe, sock, reader).await;
        budget.drained().await;
        replies.close();
        if let Err(e) = writer.await {
            tracing::debug!("NBD connection: sending replies failed: {e}");
        }
        end
    })
    .await
}

/// What the reader and the request tasks share.
struct Conn<'c, D> {
    thin: &'c Thin,
    dev: &'c D,
    shape: &'c Shape,
    stats: &'c Stats,
    budget: &'c Rc<Budget>,
    replies: &'c Replies,
}

impl<D> Clone for Conn<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for Conn<'_, D> {}

impl<'c, D: DataDevice> Conn<'c, D> {
    async fn read_requests(
        self,
        exe: &LocalExecutor<'c>,
        sock: &Socket,
        reader: &mut Reader,
    ) -> End {
        loop {
            let mut hdr = [0u8; REQUEST_BYTES];
            if let Err(e) = reader.read_exact(sock, &mut hdr).await {
                return closed_or(e);
            }
            let req = Request::decode(&hdr);
            if req.magic != proto::REQUEST_MAGIC {
                self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                return End::BadMagic(req.magic);
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let op = match request::check(&req, self.shape) {
                Ok(Op::Disconnect) => return End::Disconnect,
                Ok(op) => op,
                Err(error) => {
                    if req.cmd == proto::CMD_WRITE {
                        if let Err(e) = reader.skip(sock, u64::from(req.len)).await {
                            return closed_or(e);
                        }
                    }
                    let permit = self.budget.acquire(0).await;
                    self.reply(req.cookie, error, None, permit);
                    continue;
                }
            };
            let permit = self.budget.acquire(op.buffer_bytes(req.len)).await;
            let buf = match op {
                Op::Read if req.len > 0 => Some(IoBuf::new(req.len as usize)),
                Op::Write { .. } if req.len > 0 => {
                    let mut buf = IoBuf::new(req.len as usize);
                    if let Err(e) = reader.read_exact(sock, &mut buf).await {
                        return closed_or(e);
                    }
                    Some(buf)
                }
                Op::WriteZeroes { no_hole: true, .. } => Some(IoBuf::new(op.buffer_bytes(req.len))),
                _ => None,
            };
            exe.spawn(async move {
                let (error, data) =
                    request::run(self.thin, self.dev, op, req.offset, req.len, buf).await;
                self.reply(req.cookie, error, data, permit);
            })
            .detach();
        }
    }

    fn reply(&self, cookie: u64, error: u32, data: Option<IoBuf>, permit: Permit) {
        if error != 0 {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.replies.push(Reply {
            header: proto::simple_reply(error, cookie),
            data: if error == 0 { data } else { None },
            _permit: permit,
        });
    }
}

fn closed_or(e: io::Error) -> End {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => End::Closed,
        _ => End::Io(e),
    }
}
