//! A connection's socket: non-blocking reads and writes, and waits for readiness on the
//! connection thread's own io_uring, so one `io_uring_enter` both submits the pool's data I/O
//! and sleeps until the socket or the disk has something: no thread hop per request.
//!
//! A wait is an `IORING_OP_POLL_ADD` on the socket, pushed on block-io's standalone ring of
//! the thread. When the kernel refuses io_uring (a container's seccomp policy, the
//! `kernel.io_uring_disabled` sysctl), waits go through async-io's reactor thread instead:
//! slower (a thread wake per wait), but the same code above it.
//!
//! Invariants: a poll SQE carries no memory address, only the socket's fd, and the socket
//! (an `Rc`) is kept alive by the poll until its CQE, even when the waiting future is dropped
//! (the ring keeps it as the op's keepalive); every poll completes once the socket is shut
//! down, which the connection does before its thread exits, so the ring's drain at thread
//! exit never waits on a socket nobody will touch again.

use block_io::data::rt::{RingConfig, RingSubmitter, StandaloneOp, StandaloneRing};
use io_uring::{opcode, types};
use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// An accepted connection's stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        // Fails only when the peer is gone already (ENOTCONN): nothing left to do then.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// Readiness a wait is for.
#[derive(Debug, Clone, Copy)]
enum Interest {
    Read,
    Write,
}

/// How a connection waits for its socket.
enum Waits {
    Ring(StandaloneRing),
    Reactor(async_io::Async<Rc<Stream>>),
}

/// A connection's socket, shared by the request reader and the reply writer of one thread.
pub(crate) struct Socket {
    stream: Rc<Stream>,
    waits: Waits,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("stream", &self.stream)
            .field("uring", &matches!(self.waits, Waits::Ring(_)))
            .finish()
    }
}

impl Socket {
    /// Makes `stream` non-blocking and picks how to wait for it: this thread's io_uring, or,
    /// if io_uring cannot be set up, async-io's reactor (the error says why).
    pub(crate) fn new(stream: Stream, ring: RingConfig) -> io::Result<(Socket, Option<io::Error>)> {
        stream.set_nonblocking()?;
        let stream = Rc::new(stream);
        let ring = StandaloneRing::new(ring);
        match ring.init() {
            Ok(()) => Ok((
                Socket {
                    stream,
                    waits: Waits::Ring(ring),
                },
                None,
            )),
            Err(why) => {
                let reactor = async_io::Async::new(stream.clone())?;
                Ok((
                    Socket {
                        stream,
                        waits: Waits::Reactor(reactor),
                    },
                    Some(why),
                ))
            }
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        self.stream.shutdown(how);
    }

    async fn wait(&self, interest: Interest) -> io::Result<()> {
        match &self.waits {
            Waits::Ring(ring) => {
                let mask = match interest {
                    Interest::Read => libc::POLLIN | libc::POLLRDHUP,
                    Interest::Write => libc::POLLOUT,
                };
                let sqe =
                    opcode::PollAdd::new(types::Fd(self.stream.as_fd().as_raw_fd()), mask as u32)
                        .build();
                // SAFETY: a poll SQE points at no memory; the only thing it uses is the
                // socket's fd, and `PollWait` keeps the socket open until the CQE arrives
                // (handing it to the ring as the keepalive if the wait is dropped first).
                let op = unsafe { ring.push(sqe) }?;
                let res = PollWait {
                    ring: *ring,
                    op: Some(op),
                    keep: Some(self.stream.clone()),
                }
                .await;
                // A negative result is the poll failing (the fd closed under it); the next
                // read or write reports the real error.
                let _ = res;
                Ok(())
            }
            Waits::Reactor(a) => match interest {
                Interest::Read => a.readable().await,
                Interest::Write => a.writable().await,
            },
        }
    }

    /// Reads what is available (at least one byte, or 0 at end of stream), waiting if there
    /// is nothing yet.
    pub(crate) async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(Interest::Read).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => return res,
            }
        }
    }

    /// Writes some of `bufs` (at least one byte), waiting while the socket is full.
    pub(crate) async fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match self.stream.write_vectored(bufs) {
                Ok(0) if bufs.iter().any(|b| !b.is_empty()) => {
                    return Err(io::ErrorKind::WriteZero.into())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(Interest::Write).await?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => return res,
            }
        }
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_vectored(&[IoSlice::new(buf)]).await?;
            buf = buf.get(n..).unwrap_or_default();
        }
        Ok(())
    }
}

/// A poll SQE in flight, holding the socket open until its CQE.
struct PollWait {
    ring: StandaloneRing,
    op: Option<StandaloneOp>,
    keep: Option<Rc<Stream>>,
}

impl Future for PollWait {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let Some(op) = self.op.as_mut() else {
            return Poll::Ready(-libc::ECANCELED);
        };
        match Pin::new(op).poll(cx) {
            Poll::Ready(res) => {
                self.op = None;
                self.keep = None;
                Poll::Ready(res)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for PollWait {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.ring.detach(op, Box::new(self.keep.take()));
        }
    }
}

/// Buffered reading of requests: one `read` takes in as many requests as the socket holds;
/// large payloads bypass the buffer.
pub(crate) struct Reader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("buffered", &(self.end - self.start))
            .finish()
    }
}

impl Reader {
    pub(crate) fn new(capacity: usize) -> Reader {
        Reader {
            buf: vec![0; capacity.max(4096)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads more into the buffer; `UnexpectedEof` at end of stream.
    async fn fill(&mut self, sock: &Socket) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = sock.read_some(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// Fills `dst` entirely; `UnexpectedEof` if the stream ends first.
    pub(crate) async fn read_exact(&mut self, sock: &Socket, dst: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if self.start == self.end {
                if dst.len() - done >= self.buf.len() / 2 {
                    // A large payload: straight into its buffer, no copy.
                    let n = sock.read_some(&mut dst[done..]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    done += n;
                    continue;
                }
                self.fill(sock).await?;
            }
            let n = (self.end - self.start).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            done += n;
        }
        Ok(())
    }

    /// Reads and drops `len` bytes (the payload of a request that is refused).
    pub(crate) async fn skip(&mut self, sock: &Socket, mut len: u64) -> io::Result<()> {
        while len > 0 {
            if self.start == self.end {
                self.fill(sock).await?;
            }
            let n = ((self.end - self.start) as u64).min(len);
            self.start += n as usize;
            len -= n;
        }
        Ok(())
    }
}
