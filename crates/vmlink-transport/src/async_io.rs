//! The tokio layer: [`AsyncStream`] and [`AsyncListener`], a thin
//! `AsyncFd` skin over the blocking core, shaped like `tokio::net`.
//!
//! - Opening a channel (which may block: a vsock connect, a hybrid
//!   handshake, waiting for the host end of a virtio-serial port) runs the
//!   blocking [`Stream::connect`] on tokio's blocking pool, then switches
//!   the descriptor to non-blocking mode and registers it with the reactor.
//! - Reads and writes are `read(2)`/`send(2)` on the registered descriptor,
//!   retried on readiness; nothing ever blocks a runtime thread.
//! - stdio uses tokio's own stdin/stdout (a regular file or a terminal cannot
//!   be registered with epoll, and the terminal's flags are shared with the
//!   parent shell, so they are never made non-blocking).
//! - A stream splits into owned halves ([`AsyncStream::into_split`]) that
//!   share the registration, so one task can read while another writes.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::addr::Addr;
use crate::error::{Error, Result};
use crate::stream::{Listener, Stream, StreamKind};
use crate::sys;

/// Registers an owned descriptor with the reactor.
fn register<T: std::os::fd::AsRawFd>(owner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is `OwnedFd` or `Listener` (which owns an `OwnedFd`); both
    // keep their descriptor open and return the same one from every
    // `as_raw_fd` call until they are dropped, which happens only when the
    // `AsyncFd` itself is dropped.
    unsafe { AsyncFd::register(owner) }.map_err(io::Error::from)
}

#[derive(Debug)]
struct FdIo {
    afd: AsyncFd<OwnedFd>,
    kind: StreamKind,
    /// Whether `splice(2)` into this socket is worth it. Not for vsock:
    /// there it takes the generic page-by-page path, which measured ~1.5x
    /// slower than a 256 KiB buffered copy in a lab guest
    /// (docs/benchmarks.md).
    splice_in: bool,
}

impl FdIo {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.afd.poll_read_ready(cx))?;
            // SAFETY: the kernel writes only initialised bytes into it; `assume_init` below
            // covers exactly the `n` bytes it reports.
            let unfilled = unsafe { buf.unfilled_mut() };
            let seqpacket = self.kind == StreamKind::Seqpacket;
            match guard.try_io(|fd| {
                if seqpacket {
                    sys::recv_dontwait(fd.get_ref().as_fd(), unfilled)
                } else {
                    sys::read_uninit(fd.get_ref().as_fd(), unfilled)
                }
            }) {
                Ok(Ok(n)) => {
                    // SAFETY: the read filled the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let socket = self.kind != StreamKind::Device;
        loop {
            let mut guard = ready!(self.afd.poll_write_ready(cx))?;
            match guard.try_io(|fd| sys::write(fd.get_ref().as_fd(), buf, socket)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        if matches!(self.kind, StreamKind::Socket | StreamKind::Seqpacket) {
            match sys::shutdown_write(self.afd.get_ref().as_fd()) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
                r => r,
            }
        } else {
            Ok(())
        }
    }
}

/// Where [`AsyncStream::in_memory_chunks`] sends what is written.
#[derive(Debug)]
pub struct ChunkOut {
    /// The channel.
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Zero bytes in front of each buffer, for the receiver's header.
    pub headroom: usize,
    /// The most bytes of one write in one buffer (a longer write is taken in part).
    pub max: usize,
}

/// The reading half of an [`AsyncStream`].
#[derive(Debug)]
pub struct ReadHalf(RInner);

#[derive(Debug)]
enum RInner {
    Fd {
        io: Arc<FdIo>,
        prefix: Vec<u8>,
        pos: usize,
    },
    Stdin(tokio::io::Stdin),
    Mem(tokio::io::ReadHalf<tokio::io::DuplexStream>),
    Chunks(Chunks),
}

/// The reading side of [`AsyncStream::in_memory_chunks`]: whole buffers from a channel.
#[derive(Debug)]
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Chunks {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.cur.len() {
                let n = buf.remaining().min(self.cur.len() - self.pos);
                buf.put_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                // The sender is gone: end of stream.
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// The writing half of an [`AsyncStream`]. `poll_shutdown` half-closes.
#[derive(Debug)]
pub struct WriteHalf(WInner);

#[derive(Debug)]
enum WInner {
    Fd(Arc<FdIo>),
    /// A seqpacket socket: each record is sent with a blocking send on
    /// tokio's blocking pool, so a record is never split or repeated.
    Record {
        io: Arc<FdIo>,
        pending: Option<tokio::task::JoinHandle<io::Result<usize>>>,
    },
    Stdout(Option<tokio::io::Stdout>),
    Mem(tokio::io::WriteHalf<tokio::io::DuplexStream>),
    Chunks(ChunkWriter),
}

/// The writing side of [`AsyncStream::in_memory_chunks`]: each write becomes one buffer on a
/// channel, after `headroom` bytes left for the receiver's own header.
#[derive(Debug)]
struct ChunkWriter {
    /// Closed once shut down: the receiver then sees the channel end.
    tx: tokio_util::sync::PollSender<Vec<u8>>,
    headroom: usize,
    max: usize,
}

fn reader_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the in-process reader is gone")
}

impl ChunkWriter {
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.tx.is_closed() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the in-process stream is closed for writing",
            )));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| reader_gone())?;
        let n = buf.len().min(self.max);
        let mut chunk = Vec::with_capacity(self.headroom + n);
        chunk.resize(self.headroom, 0);
        chunk.extend_from_slice(&buf[..n]);
        self.tx.send_item(chunk).map_err(|_| reader_gone())?;
        Poll::Ready(Ok(n))
    }
}

/// A non-blocking channel for tokio: any [`Addr`] that connects.
#[derive(Debug)]
pub struct AsyncStream {
    r: ReadHalf,
    w: WriteHalf,
    label: String,
}

impl AsyncStream {
    /// Opens a connecting address (see [`Stream::connect`]) without blocking
    /// the runtime.
    pub async fn connect(addr: &Addr) -> Result<AsyncStream> {
        let a = addr.clone();
        let s = tokio::task::spawn_blocking(move || Stream::connect(&a))
            .await
            .map_err(|e| Error::Io {
                context: format!("connecting to {addr}"),
                source: io::Error::other(e),
            })??;
        AsyncStream::from_std(s)
    }

    /// Registers a blocking-core stream with the reactor.
    pub fn from_std(s: Stream) -> Result<AsyncStream> {
        let label = s.label().to_string();
        let (fd, _wfd, kind, prefix, label2) = s.into_parts();
        debug_assert_eq!(label, label2);
        let reg = |fd: OwnedFd| -> Result<Arc<FdIo>> {
            // Seqpacket descriptors stay blocking: reads use MSG_DONTWAIT,
            // writes a blocking send off the runtime threads.
            sys::set_nonblocking(fd.as_fd(), kind != StreamKind::Seqpacket)
                .and_then(|()| register(fd))
                .map(|afd| {
                    let splice_in = kind == StreamKind::Socket
                        && sys::socket_domain(afd.get_ref().as_fd())
                            .is_ok_and(|d| d != libc::AF_VSOCK);
                    Arc::new(FdIo {
                        afd,
                        kind,
                        splice_in,
                    })
                })
                .map_err(|source| Error::Io {
                    context: format!("registering {label} with the reactor"),
                    source,
                })
        };
        let (r, w) = match kind {
            StreamKind::Stdio => {
                // The dup'd descriptors are dropped: tokio's stdio owns 0 and 1.
                (
                    ReadHalf(RInner::Stdin(tokio::io::stdin())),
                    WriteHalf(WInner::Stdout(Some(tokio::io::stdout()))),
                )
            }
            _ => {
                let io = reg(fd)?;
                let w = if kind == StreamKind::Seqpacket {
                    WInner::Record {
                        io: io.clone(),
                        pending: None,
                    }
                } else {
                    WInner::Fd(io.clone())
                };
                (ReadHalf(RInner::Fd { io, prefix, pos: 0 }), WriteHalf(w))
            }
        };
        Ok(AsyncStream { r, w, label })
    }

    /// A stream over one end of an in-process pipe (`tokio::io::duplex`): what a multiplexer
    /// inside the process hands out as a connection, without a socket pair's system calls
    /// and kernel copies. It has no descriptor (no `splice`, no vsock peer).
    pub fn in_memory(end: tokio::io::DuplexStream, label: impl Into<String>) -> AsyncStream {
        let (r, w) = tokio::io::split(end);
        AsyncStream {
            r: ReadHalf(RInner::Mem(r)),
            w: WriteHalf(WInner::Mem(w)),
            label: label.into(),
        }
    }

    /// A stream over two channels of whole buffers, what the guest's serial multiplexer hands
    /// out: no pipe between it and the session, so a byte is copied once in user space each way.
    ///
    /// - Reading: the buffers sent on `data`, each handed to the reader as it is; dropping the
    ///   sender is end of stream.
    /// - Writing: each write becomes one buffer on `out` (at most `out.max` bytes of it), after
    ///   `out.headroom` zero bytes that the receiver may fill with its own header, so that it
    ///   frames the buffer without copying it again. Shutting down (or dropping) the writing
    ///   half drops the sender: end of stream for the receiver.
    pub fn in_memory_chunks(
        data: tokio::sync::mpsc::Receiver<Vec<u8>>,
        out: ChunkOut,
        label: impl Into<String>,
    ) -> AsyncStream {
        AsyncStream {
            r: ReadHalf(RInner::Chunks(Chunks {
                rx: data,
                cur: Vec::new(),
                pos: 0,
            })),
            w: WriteHalf(WInner::Chunks(ChunkWriter {
                tx: tokio_util::sync::PollSender::new(out.tx),
                headroom: out.headroom,
                max: out.max.max(1),
            })),
            label: label.into(),
        }
    }

    /// The address this stream was opened from or accepted on.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The (CID, port) of a vsock peer; see [`ReadHalf::vsock_peer`].
    pub fn vsock_peer(&self) -> io::Result<(u32, u32)> {
        self.r.vsock_peer()
    }

    /// Splits into halves that can move to different tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.r, self.w)
    }

    /// Half-closes: the peer reads EOF; reading goes on.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.w.shutdown_write()
    }
}

impl ReadHalf {
    /// The (CID, port) of a vsock peer (stream or seqpacket); an error for
    /// other kinds of channel.
    pub fn vsock_peer(&self) -> io::Result<(u32, u32)> {
        match &self.0 {
            RInner::Fd { io, .. } => sys::vsock_name(io.afd.get_ref().as_fd(), true),
            RInner::Stdin(_) | RInner::Mem(_) | RInner::Chunks(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "stdin and in-process streams have no vsock peer",
            )),
        }
    }

    /// The descriptor to `splice(2)` from, when there is one and no
    /// handshake bytes are still buffered in user space.
    pub fn splice_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            RInner::Fd { io, prefix, pos }
                if *pos >= prefix.len() && io.kind == StreamKind::Socket =>
            {
                Some(io.afd.get_ref().as_fd())
            }
            _ => None,
        }
    }

    /// Waits until the descriptor is readable, then runs `f` on it; `f`
    /// returning `WouldBlock` clears the readiness and waits again.
    pub async fn read_with<R>(
        &self,
        mut f: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        match &self.0 {
            RInner::Fd { io, .. } => loop {
                let mut g = io.afd.readable().await?;
                match g.try_io(|fd| f(fd.get_ref().as_fd())) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            },
            RInner::Stdin(_) | RInner::Mem(_) | RInner::Chunks(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "stdin and in-process streams have no descriptor to wait on",
            )),
        }
    }
}

impl WriteHalf {
    /// For an [`AsyncStream::in_memory_chunks`] stream, the shape of the buffers it carries:
    /// `(headroom, max)` as in its [`ChunkOut`]. A writer that builds buffers of that shape
    /// can hand them over whole with [`WriteHalf::send_chunk`] instead of having them copied.
    pub fn chunk_shape(&self) -> Option<(usize, usize)> {
        match &self.0 {
            WInner::Chunks(c) => Some((c.headroom, c.max)),
            _ => None,
        }
    }

    /// Sends `chunk` (`headroom` bytes of room, then 1 to `max` bytes of data; see
    /// [`WriteHalf::chunk_shape`]) as it is, after what was written before it. An error for
    /// a buffer of another shape, and for other kinds of stream.
    pub async fn send_chunk(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        let WInner::Chunks(c) = &mut self.0 else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only in-process chunk streams take whole buffers",
            ));
        };
        let data = chunk.len().saturating_sub(c.headroom);
        if chunk.len() <= c.headroom || data > c.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte buffer for a stream of {} bytes of room and 1 to {} of data",
                    chunk.len(),
                    c.headroom,
                    c.max
                ),
            ));
        }
        if c.tx.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the in-process stream is closed for writing",
            ));
        }
        std::future::poll_fn(|cx| c.tx.poll_reserve(cx))
            .await
            .map_err(|_| reader_gone())?;
        c.tx.send_item(chunk).map_err(|_| reader_gone())
    }

    /// The descriptor to `splice(2)` into, when there is one and splicing
    /// into it pays (not for vsock sockets).
    pub fn splice_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            WInner::Fd(io) if io.splice_in => Some(io.afd.get_ref().as_fd()),
            _ => None,
        }
    }

    /// Waits until the descriptor is writable, then runs `f` on it (see
    /// [`ReadHalf::read_with`]).
    pub async fn write_with<R>(
        &self,
        mut f: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        match &self.0 {
            WInner::Fd(io) => loop {
                let mut g = io.afd.writable().await?;
                match g.try_io(|fd| f(fd.get_ref().as_fd())) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            },
            WInner::Record { .. } | WInner::Stdout(_) | WInner::Mem(_) | WInner::Chunks(_) => {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no descriptor to wait on for this kind",
                ))
            }
        }
    }

    /// Half-closes now (`shutdown(SHUT_WR)`; closes stdout for stdio).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match &mut self.0 {
            WInner::Fd(io) | WInner::Record { io, .. } => io.shutdown_write(),
            WInner::Stdout(s) => {
                *s = None;
                Ok(())
            }
            WInner::Chunks(c) => {
                // No reserved slot may keep the channel open behind the close.
                c.tx.abort_send();
                c.tx.close();
                Ok(())
            }
            WInner::Mem(w) => {
                // A duplex end shuts down at once (it only marks the pipe closed and wakes
                // the reader), so one poll is the whole operation.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(w).poll_shutdown(&mut cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "in-process stream shutdown pending",
                    )),
                }
            }
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            RInner::Fd { io, prefix, pos } => {
                if *pos < prefix.len() {
                    let n = buf.remaining().min(prefix.len() - *pos);
                    buf.put_slice(&prefix[*pos..*pos + n]);
                    *pos += n;
                    if *pos == prefix.len() {
                        *prefix = Vec::new();
                        *pos = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                io.poll_read(cx, buf)
            }
            RInner::Stdin(s) => Pin::new(s).poll_read(cx, buf),
            RInner::Mem(m) => Pin::new(m).poll_read(cx, buf),
            RInner::Chunks(c) => c.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            WInner::Fd(io) => io.poll_write(cx, buf),
            WInner::Record { io, pending } => {
                let h = pending.get_or_insert_with(|| {
                    let (io2, rec) = (io.clone(), buf.to_vec());
                    tokio::task::spawn_blocking(move || {
                        sys::write(io2.afd.get_ref().as_fd(), &rec, true)
                    })
                });
                let r = ready!(Pin::new(h).poll(cx));
                *pending = None;
                Poll::Ready(r.unwrap_or_else(|e| Err(io::Error::other(e))))
            }
            WInner::Stdout(Some(s)) => Pin::new(s).poll_write(cx, buf),
            WInner::Stdout(None) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdout was shut down",
            ))),
            WInner::Mem(m) => Pin::new(m).poll_write(cx, buf),
            WInner::Chunks(c) => c.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            WInner::Stdout(Some(s)) => Pin::new(s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let WInner::Stdout(Some(s)) = &mut this.0 {
            ready!(Pin::new(s).poll_flush(cx))?;
        }
        Poll::Ready(this.shutdown_write())
    }
}

impl AsyncRead for AsyncStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().r).poll_read(cx, buf)
    }
}

impl AsyncWrite for AsyncStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().w).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().w).poll_shutdown(cx)
    }
}

/// A listening channel for tokio.
#[derive(Debug)]
pub struct AsyncListener {
    inner: AsyncFd<Listener>,
}

impl AsyncListener {
    /// Binds a `-listen` address (see [`Listener::bind`]).
    pub fn bind(addr: &Addr) -> Result<AsyncListener> {
        AsyncListener::from_std(Listener::bind(addr)?)
    }

    /// Registers a blocking-core listener with the reactor.
    pub fn from_std(l: Listener) -> Result<AsyncListener> {
        let label = l.local_addr().to_string();
        sys::set_nonblocking(l.as_fd(), true)
            .and_then(|()| register(l))
            .map(|inner| AsyncListener { inner })
            .map_err(|source| Error::Bind {
                addr: label,
                source,
            })
    }

    /// The address as bound, with a kernel-chosen port filled in.
    pub fn local_addr(&self) -> &Addr {
        self.inner.get_ref().local_addr()
    }

    /// Waits for one connection.
    pub async fn accept(&self) -> Result<AsyncStream> {
        loop {
            let mut g = self
                .inner
                .readable()
                .await
                .map_err(|source| Error::Accept {
                    addr: self.local_addr().to_string(),
                    source,
                })?;
            match g.try_io(|l| sys::accept(l.get_ref().as_fd())) {
                Ok(Ok(fd)) => return AsyncStream::from_std(self.inner.get_ref().accepted(fd)?),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(source)) => {
                    return Err(Error::Accept {
                        addr: self.local_addr().to_string(),
                        source,
                    })
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reading yields the buffers sent, in order, then end of stream; each write becomes one
    /// buffer with the header room in front, cut at `max`; shutting down ends the receiver's
    /// channel; writing once the receiver is gone is a broken pipe.
    #[tokio::test]
    async fn in_memory_chunks_carry_whole_buffers_both_ways() {
        let (data_tx, data) = tokio::sync::mpsc::channel(4);
        let (tx, mut out) = tokio::sync::mpsc::channel(4);
        let s = AsyncStream::in_memory_chunks(
            data,
            ChunkOut {
                tx,
                headroom: 3,
                max: 5,
            },
            "test",
        );
        let (mut r, mut w) = s.into_split();

        data_tx.send(b"abc".to_vec()).await.expect("send");
        data_tx.send(b"defg".to_vec()).await.expect("send");
        drop(data_tx);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"abcdefg");

        w.write_all(b"hello world").await.expect("write");
        assert_eq!(out.recv().await.expect("1st"), b"\0\0\0hello");
        assert_eq!(out.recv().await.expect("2nd"), b"\0\0\0 worl");
        assert_eq!(out.recv().await.expect("3rd"), b"\0\0\0d");
        w.shutdown_write().expect("shutdown");
        assert_eq!(out.recv().await, None, "end of stream after shutdown");
        let e = w.write_all(b"x").await.expect_err("closed for writing");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);

        let (_data_tx, data) = tokio::sync::mpsc::channel(1);
        let (tx, out) = tokio::sync::mpsc::channel(1);
        let (_, mut w) = AsyncStream::in_memory_chunks(
            data,
            ChunkOut {
                tx,
                headroom: 0,
                max: 8,
            },
            "test",
        )
        .into_split();
        drop(out);
        let e = w.write_all(b"x").await.expect_err("reader gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    /// Whole buffers of the stream's shape go over as they are, in order with writes; other
    /// shapes and other kinds of stream are refused.
    #[tokio::test]
    async fn whole_chunks_go_over_as_they_are_between_writes() {
        let (_data_tx, data) = tokio::sync::mpsc::channel(1);
        let (tx, mut out) = tokio::sync::mpsc::channel(4);
        let (_, mut w) = AsyncStream::in_memory_chunks(
            data,
            ChunkOut {
                tx,
                headroom: 2,
                max: 4,
            },
            "test",
        )
        .into_split();
        assert_eq!(w.chunk_shape(), Some((2, 4)));
        let chunk = b"\0\0wxyz".to_vec();
        let at = chunk.as_ptr();
        w.write_all(b"ab").await.expect("write");
        w.send_chunk(chunk).await.expect("chunk");
        let first = out.recv().await.expect("1st");
        assert_eq!(first, b"\0\0ab");
        let second = out.recv().await.expect("2nd");
        assert_eq!(second, b"\0\0wxyz");
        assert_eq!(second.as_ptr(), at, "the buffer itself, not a copy");
        for bad in [&b"\0\0"[..], b"\0\0vwxyz"] {
            let e = w.send_chunk(bad.to_vec()).await.expect_err("wrong shape");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let (_, mut sock) = AsyncStream::from_std(Stream::from_unix(a, "pair"))
            .expect("stream")
            .into_split();
        assert_eq!(sock.chunk_shape(), None);
        let e = sock
            .send_chunk(b"\0\0ab".to_vec())
            .await
            .expect_err("a socket");
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }

    /// A write waiting for room on a full channel fails once the receiver goes away (the mux
    /// reset the stream); a write given up while waiting, then a shutdown, still ends the
    /// receiver's channel.
    #[tokio::test]
    async fn a_blocked_chunk_write_fails_on_reset_and_a_cancelled_one_does_not_hold_the_stream_open(
    ) {
        let deadline = std::time::Duration::from_secs(5);
        let chunks = |out| {
            let (_data_tx, data) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
            let s = AsyncStream::in_memory_chunks(
                data,
                ChunkOut {
                    tx: out,
                    headroom: 2,
                    max: 4,
                },
                "test",
            );
            (_data_tx, s.into_split().1)
        };

        let (tx, out) = tokio::sync::mpsc::channel(1);
        let (_keep, mut w) = chunks(tx);
        w.write_all(b"abcd").await.expect("fills the channel");
        let blocked = tokio::spawn(async move { w.write_all(b"efgh").await });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished(), "the second write waits for room");
        drop(out);
        let r = tokio::time::timeout(deadline, blocked)
            .await
            .expect("the blocked write ends")
            .expect("task");
        assert_eq!(
            r.expect_err("receiver gone").kind(),
            io::ErrorKind::BrokenPipe
        );

        let (tx, mut out) = tokio::sync::mpsc::channel(1);
        let (_keep, mut w) = chunks(tx);
        w.write_all(b"abcd").await.expect("fills the channel");
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(20), w.write_all(b"efgh")).await;
        assert!(gave_up.is_err(), "the write was still waiting for room");
        w.shutdown_write().expect("shutdown");
        assert_eq!(out.recv().await.expect("the first write"), b"\0\0abcd");
        let end = tokio::time::timeout(deadline, out.recv())
            .await
            .expect("the channel ends");
        assert_eq!(end, None, "nothing after the shutdown");
    }
}
