//! The blocking core: [`Stream`] and [`Listener`], shaped like
//! `std::net::TcpStream` and `std::net::TcpListener`, over every channel.
//!
//! Every channel is one owned file descriptor (stdio is two), so one type
//! serves them all: `Read`/`Write` on the descriptor, `shutdown(SHUT_WR)` for
//! a half-close, `AsFd` for poll loops and `splice(2)`. What differs between
//! channels is only how the descriptor is obtained, which is what
//! [`Stream::connect`] and [`Listener::bind`] dispatch on:
//!
//! - **vsock**: `socket(AF_VSOCK)`, options from the address
//!   (`SO_VM_SOCKETS_BUFFER_*`, `SO_VM_SOCKETS_CONNECT_TIMEOUT`), then
//!   connect or bind+listen. Errors that the kernel reports with a bare errno
//!   (`ENODEV` for a missing datagram transport, `ECONNRESET` for a refused
//!   connection) are turned into sentences.
//! - **hvsock**: a Unix connection to the VMM's socket, then the
//!   `CONNECT <port>` / `OK <n>` handshake, parsed by
//!   [`vmlink_proto::hybrid`]; bytes that arrive after the reply line are kept
//!   and returned by the first reads. The listening side binds `UDS_PATH_PORT`.
//! - **vport**: the guest's character device. Until the host side is
//!   connected, reads return EOF at once and writes block, so `connect`
//!   waits (bounded by `connect-timeout`) until the host end is open.
//! - **unix**, **tcp**: through `std`, then taken apart into the descriptor.

use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_proto::hybrid::{self, Handshake, HandshakeError};

use crate::addr::{Addr, Cid, Endpoint, VsockPort, VsockType, PORT_ANY};
use crate::error::{Error, Result};
use crate::sys;

/// How long a hybrid vsock handshake may take when the address sets no
/// `connect-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = hybrid::DEFAULT_TIMEOUT;

/// The default listen(2) backlog.
pub const DEFAULT_BACKLOG: u32 = 128;

/// What kind of descriptor a [`Stream`] holds; decides how it is written to
/// and half-closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// A connected byte-stream socket (vsock stream, unix, hvsock, tcp).
    Socket,
    /// A connected vsock seqpacket socket: one write is one record. Its
    /// writes are always blocking sends (see the async layer), because a
    /// non-blocking send that runs out of credit mid-record reports
    /// `EAGAIN` after queueing part of the record (Linux 6.1), and a retry
    /// would duplicate that part.
    Seqpacket,
    /// A character device (virtio-serial port): no half-close.
    Device,
    /// The process's stdin and stdout.
    Stdio,
    /// A bound vsock datagram socket that answers whoever wrote last.
    Datagram,
}

/// One open channel. Reads and writes block unless the descriptor was put in
/// non-blocking mode by the async layer.
#[derive(Debug)]
pub struct Stream {
    fd: OwnedFd,
    /// stdout, for stdio; every other kind reads and writes `fd`.
    wfd: Option<OwnedFd>,
    kind: StreamKind,
    /// Bytes that arrived with a handshake reply, returned before `fd` is read.
    prefix: Vec<u8>,
    prefix_pos: usize,
    /// For datagram sockets: the sender of the last datagram.
    dgram_peer: Option<(u32, u32)>,
    /// A description for errors and logs (the address it was opened from).
    label: String,
}

impl Stream {
    fn new(fd: OwnedFd, kind: StreamKind, label: String) -> Stream {
        Stream {
            fd,
            wfd: None,
            kind,
            prefix: Vec::new(),
            prefix_pos: 0,
            dgram_peer: None,
            label,
        }
    }

    /// Wraps a connected Unix socket (e.g. one end of a socketpair); `label` names it in
    /// errors and logs.
    pub fn from_unix(s: std::os::unix::net::UnixStream, label: impl Into<String>) -> Stream {
        Stream::new(OwnedFd::from(s), StreamKind::Socket, label.into())
    }

    /// Opens a connecting address (anything but the `-listen` kinds, except
    /// `vsock-dgram-listen`, which opens one bound datagram socket).
    pub fn connect(addr: &Addr) -> Result<Stream> {
        let label = addr.to_string();
        let timeout = addr.options.connect_timeout;
        match &addr.endpoint {
            Endpoint::Vsock { ty, cid, port } => vsock_connect(addr, *ty, *cid, *port),
            Endpoint::VsockListen {
                ty: VsockType::Dgram,
                cid,
                port,
            } => {
                let fd = vsock_socket(addr, VsockType::Dgram)?;
                sys::vsock_bind(fd.as_fd(), cid.0, port.0).map_err(|source| Error::Bind {
                    addr: label.clone(),
                    source,
                })?;
                Ok(Stream::new(fd, StreamKind::Datagram, label))
            }
            Endpoint::Unix(path) => {
                let s = match addr.options.connect_timeout {
                    Some(t) => unix_connect_by(path, Instant::now() + t),
                    None => UnixStream::connect(path),
                }
                .map_err(|e| connect_error(&label, e))?;
                finish_socket(addr, s.into())
            }
            Endpoint::UnixAbstract(name) => {
                let sa = UnixSocketAddr::from_abstract_name(name.as_bytes()).map_err(|source| {
                    Error::Connect {
                        addr: label.clone(),
                        source,
                    }
                })?;
                let s = UnixStream::connect_addr(&sa).map_err(|e| connect_error(&label, e))?;
                finish_socket(addr, s.into())
            }
            Endpoint::Hvsock { uds, port } => hvsock_connect(addr, uds, *port),
            Endpoint::Vport(name) => vport_open(addr, &Addr::vport_path(name), timeout),
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|source| Error::Resolve {
                        host: host.clone(),
                        source,
                    })?
                    .collect();
                let mut last = None;
                for sa in addrs {
                    let r = match timeout {
                        Some(t) => std::net::TcpStream::connect_timeout(&sa, t),
                        None => std::net::TcpStream::connect(sa),
                    };
                    match r {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return finish_socket(addr, s.into());
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let e =
                    last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no addresses"));
                if e.kind() == io::ErrorKind::TimedOut {
                    return Err(Error::Timeout {
                        addr: label,
                        after: timeout.unwrap_or_default(),
                    });
                }
                Err(connect_error(&label, e))
            }
            Endpoint::Stdio => {
                let stdin = sys::dup(io::stdin().as_fd()).map_err(|source| Error::Connect {
                    addr: label.clone(),
                    source,
                })?;
                let stdout = sys::dup(io::stdout().as_fd()).map_err(|source| Error::Connect {
                    addr: label.clone(),
                    source,
                })?;
                let mut s = Stream::new(stdin, StreamKind::Stdio, label);
                s.wfd = Some(stdout);
                Ok(s)
            }
            _ => Err(Error::WrongDirection {
                addr: label,
                what: "a listening address; this needs a connecting one (drop `-listen`)",
            }),
        }
    }

    /// Ends the writing direction: the peer reads EOF, and can still send.
    /// On a virtio-serial port (no half-close in the device) and on a
    /// datagram socket this does nothing; on stdio it closes stdout.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self.kind {
            StreamKind::Socket | StreamKind::Seqpacket => {
                match sys::shutdown_write(self.fd.as_fd()) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
                    r => r,
                }
            }
            StreamKind::Stdio => {
                self.wfd = None;
                Ok(())
            }
            StreamKind::Device | StreamKind::Datagram => Ok(()),
        }
    }

    /// The kind of descriptor.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// The address this stream was opened from (or accepted on).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The descriptor writes go to.
    pub fn write_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.kind {
            StreamKind::Stdio => self.wfd.as_ref().map(|f| f.as_fd()),
            _ => Some(self.fd.as_fd()),
        }
    }

    /// Bytes received with the handshake and not read yet.
    pub fn pending_prefix(&self) -> &[u8] {
        &self.prefix[self.prefix_pos..]
    }

    /// Takes the handshake leftovers out (for layers that read the fd directly).
    pub fn take_prefix(&mut self) -> Vec<u8> {
        let v = self.prefix.split_off(self.prefix_pos);
        self.prefix.clear();
        self.prefix_pos = 0;
        v
    }

    /// The (CID, port) of a vsock stream's own end.
    pub fn vsock_local(&self) -> io::Result<(u32, u32)> {
        sys::vsock_name(self.fd.as_fd(), false)
    }

    /// The (CID, port) of a vsock stream's peer.
    pub fn vsock_peer(&self) -> io::Result<(u32, u32)> {
        sys::vsock_name(self.fd.as_fd(), true)
    }

    /// Reads `SO_VM_SOCKETS_BUFFER_SIZE` (vsock only).
    pub fn vsock_buffer_size(&self) -> io::Result<u64> {
        sys::get_vsock_u64(self.fd.as_fd(), sys::SO_VM_SOCKETS_BUFFER_SIZE)
    }

    /// Puts the descriptor(s) in non-blocking mode or back.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        sys::set_nonblocking(self.fd.as_fd(), on)?;
        if let Some(w) = &self.wfd {
            sys::set_nonblocking(w.as_fd(), on)?;
        }
        Ok(())
    }

    /// Splits into the parts the async layer needs.
    pub(crate) fn into_parts(self) -> (OwnedFd, Option<OwnedFd>, StreamKind, Vec<u8>, String) {
        let Stream {
            fd,
            wfd,
            kind,
            mut prefix,
            prefix_pos,
            label,
            ..
        } = self;
        let rest = prefix.split_off(prefix_pos);
        (fd, wfd, kind, rest, label)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.prefix_pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.prefix_pos);
            buf[..n].copy_from_slice(&self.prefix[self.prefix_pos..self.prefix_pos + n]);
            self.prefix_pos += n;
            return Ok(n);
        }
        if self.kind == StreamKind::Datagram {
            let (n, cid, port) = sys::vsock_recv_from(self.fd.as_fd(), buf)?;
            self.dgram_peer = Some((cid, port));
            return Ok(n);
        }
        sys::read(self.fd.as_fd(), buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.kind {
            StreamKind::Socket | StreamKind::Seqpacket => sys::write(self.fd.as_fd(), buf, true),
            StreamKind::Device => sys::write(self.fd.as_fd(), buf, false),
            StreamKind::Stdio => match &self.wfd {
                Some(w) => sys::write(w.as_fd(), buf, false),
                None => Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "stdout was shut down",
                )),
            },
            StreamKind::Datagram => match self.dgram_peer {
                Some((cid, port)) => sys::vsock_send_to(self.fd.as_fd(), buf, cid, port),
                None => sys::write(self.fd.as_fd(), buf, true),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening channel, shaped like `std::net::TcpListener`.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    addr: Addr,
    /// The file to remove on drop (unix and hvsock listeners).
    unlink_on_drop: Option<std::path::PathBuf>,
}

impl Listener {
    /// Binds and listens on a `-listen` address. For `vsock-listen:any` the
    /// kernel picks a port; [`Listener::local_addr`] reports it.
    pub fn bind(addr: &Addr) -> Result<Listener> {
        let label = addr.to_string();
        let backlog = addr.options.backlog.unwrap_or(DEFAULT_BACKLOG);
        let bind_err = |source| Error::Bind {
            addr: label.clone(),
            source,
        };
        let (fd, unlink) = match &addr.endpoint {
            Endpoint::VsockListen {
                ty: ty @ (VsockType::Stream | VsockType::Seqpacket),
                cid,
                port,
            } => {
                let fd = vsock_socket(addr, *ty)?;
                apply_vsock_options(addr, fd.as_fd())?;
                sys::vsock_bind(fd.as_fd(), cid.0, port.0).map_err(bind_err)?;
                sys::listen(fd.as_fd(), backlog).map_err(bind_err)?;
                (fd, None)
            }
            Endpoint::UnixListen(path) => (unix_bind(addr, path, backlog)?, Some(path.clone())),
            Endpoint::HvsockListen { uds, port } => {
                let path = Addr::hvsock_listener_path(uds, *port);
                (unix_bind(addr, &path, backlog)?, Some(path))
            }
            Endpoint::UnixAbstractListen(name) => {
                let sa = UnixSocketAddr::from_abstract_name(name.as_bytes()).map_err(bind_err)?;
                let l = UnixListener::bind_addr(&sa).map_err(bind_err)?;
                (OwnedFd::from(l), None)
            }
            Endpoint::TcpListen { host, port } => {
                let h = host.as_deref().unwrap_or("0.0.0.0");
                let l = std::net::TcpListener::bind((h, *port)).map_err(bind_err)?;
                let fd = OwnedFd::from(l);
                if backlog != DEFAULT_BACKLOG {
                    sys::listen(fd.as_fd(), backlog).map_err(bind_err)?;
                }
                (fd, None)
            }
            _ => {
                return Err(Error::WrongDirection {
                    addr: label,
                    what: "a connecting address; this needs a `-listen` one",
                })
            }
        };
        let mut l = Listener {
            fd,
            addr: addr.clone(),
            unlink_on_drop: unlink,
        };
        l.addr = l.resolve_local_addr();
        Ok(l)
    }

    /// Fills in what the kernel chose: the vsock port for `any`, the TCP port for 0.
    fn resolve_local_addr(&self) -> Addr {
        let mut a = self.addr.clone();
        match &mut a.endpoint {
            Endpoint::VsockListen { port, .. } if port.0 == PORT_ANY => {
                if let Ok((_, p)) = sys::vsock_name(self.fd.as_fd(), false) {
                    *port = VsockPort(p);
                }
            }
            Endpoint::TcpListen { port: 0, .. } => {
                if let Ok(l) = self.fd.try_clone().map(std::net::TcpListener::from) {
                    if let Ok(sa) = l.local_addr() {
                        a.endpoint = Endpoint::TcpListen {
                            host: Some(sa.ip().to_string()),
                            port: sa.port(),
                        };
                    }
                }
            }
            _ => {}
        }
        a
    }

    /// The address as bound, with any port the kernel picked filled in.
    pub fn local_addr(&self) -> &Addr {
        &self.addr
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<Stream> {
        let fd = sys::accept(self.fd.as_fd()).map_err(|source| Error::Accept {
            addr: self.addr.to_string(),
            source,
        })?;
        self.accepted(fd)
    }

    /// Wraps an accepted descriptor: blocking mode, TCP_NODELAY, vsock options.
    pub(crate) fn accepted(&self, fd: OwnedFd) -> Result<Stream> {
        sys::set_nonblocking(fd.as_fd(), false).map_err(|source| Error::Accept {
            addr: self.addr.to_string(),
            source,
        })?;
        if let Endpoint::TcpListen { .. } = self.addr.endpoint {
            if let Ok(s) = fd.try_clone().map(std::net::TcpStream::from) {
                let _ = s.set_nodelay(true);
            }
        }
        finish_socket(&self.addr, fd)
    }

    /// An endless iterator of accepted connections, like `TcpListener::incoming`.
    pub fn incoming(&self) -> impl Iterator<Item = Result<Stream>> + '_ {
        std::iter::repeat_with(move || self.accept())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::os::fd::AsRawFd for Listener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = self.unlink_on_drop.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------- helpers

/// Connects to the Unix socket at `path`, giving up at `deadline`. A listener whose queue is
/// full makes a blocking `connect(2)` wait until it accepts, with no time limit; a non-blocking
/// one says `EAGAIN` instead, and there is no event for room in another socket's queue, so it
/// is tried again every 10 ms until the deadline.
fn unix_connect_by(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let sa = UnixAddr::new(path).map_err(io::Error::from)?;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)?;
        match connect(fd.as_raw_fd(), &sa) {
            Ok(()) => {
                let s = UnixStream::from(fd);
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "its listen queue stayed full until the connect timeout",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn connect_error(label: &str, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Error::Refused {
            addr: label.to_string(),
            why: "nothing listens there",
        },
        io::ErrorKind::NotFound => Error::Connect {
            addr: label.to_string(),
            source: e,
        },
        _ => Error::Connect {
            addr: label.to_string(),
            source: e,
        },
    }
}

fn vsock_socket(addr: &Addr, ty: VsockType) -> Result<OwnedFd> {
    let label = addr.to_string();
    sys::vsock_socket(sys::sock_type(ty)).map_err(|source| match source.raw_os_error() {
        Some(libc::ENODEV) if ty == VsockType::Dgram => Error::DgramUnsupported { addr: label },
        Some(libc::EAFNOSUPPORT) | Some(libc::ENODEV) => Error::NoVsock {
            addr: label,
            source,
        },
        Some(libc::ESOCKTNOSUPPORT) | Some(libc::EPROTONOSUPPORT) if ty == VsockType::Dgram => {
            Error::DgramUnsupported { addr: label }
        }
        _ => Error::Connect {
            addr: label,
            source,
        },
    })
}

fn apply_vsock_options(addr: &Addr, fd: BorrowedFd<'_>) -> Result<()> {
    let o = &addr.options;
    let set = |option: &'static str, opt, v: Option<u64>| -> Result<()> {
        match v {
            Some(v) => sys::set_vsock_u64(fd, opt, v).map_err(|source| Error::SetOption {
                addr: addr.to_string(),
                option,
                source,
            }),
            None => Ok(()),
        }
    };
    // The kernel clamps BUFFER_SIZE into [MIN, MAX]: raise MAX first.
    set(
        "buffer-max-size",
        sys::SO_VM_SOCKETS_BUFFER_MAX_SIZE,
        o.buffer_max_size.or(o.buffer_size),
    )?;
    set(
        "buffer-min-size",
        sys::SO_VM_SOCKETS_BUFFER_MIN_SIZE,
        o.buffer_min_size,
    )?;
    set("buffer-size", sys::SO_VM_SOCKETS_BUFFER_SIZE, o.buffer_size)?;
    if let Some(t) = o.connect_timeout {
        sys::set_vsock_connect_timeout(fd, t).map_err(|source| Error::SetOption {
            addr: addr.to_string(),
            option: "connect-timeout",
            source,
        })?;
    }
    Ok(())
}

fn vsock_connect(addr: &Addr, ty: VsockType, cid: Cid, port: VsockPort) -> Result<Stream> {
    let label = addr.to_string();
    let fd = vsock_socket(addr, ty)?;
    apply_vsock_options(addr, fd.as_fd())?;
    sys::vsock_connect(fd.as_fd(), cid.0, port.0).map_err(|source| {
        match source.raw_os_error() {
            // vsock reports a refused connection as a reset.
            Some(libc::ECONNRESET) | Some(libc::ECONNREFUSED) => Error::Refused {
                addr: label.clone(),
                why: "nothing listens on that vsock port",
            },
            Some(libc::ETIMEDOUT) => Error::Timeout {
                addr: label.clone(),
                // The kernel's default SO_VM_SOCKETS_CONNECT_TIMEOUT is 2 s.
                after: addr
                    .options
                    .connect_timeout
                    .unwrap_or(Duration::from_secs(2)),
            },
            Some(libc::ENODEV) => Error::NoVsock {
                addr: label.clone(),
                source,
            },
            _ => Error::Connect {
                addr: label.clone(),
                source,
            },
        }
    })?;
    let kind = match ty {
        VsockType::Dgram => StreamKind::Datagram,
        VsockType::Seqpacket => StreamKind::Seqpacket,
        VsockType::Stream => StreamKind::Socket,
    };
    Ok(Stream::new(fd, kind, label))
}

/// Applies buffer options to an established unix/tcp/vsock socket.
fn finish_socket(addr: &Addr, fd: OwnedFd) -> Result<Stream> {
    if let Some(n) = addr.options.buffer_size {
        if !addr.is_vsock() {
            sys::set_socket_buffers(fd.as_fd(), n).map_err(|source| Error::SetOption {
                addr: addr.to_string(),
                option: "buffer-size",
                source,
            })?;
        }
    }
    let kind = match addr.endpoint {
        Endpoint::VsockListen {
            ty: VsockType::Seqpacket,
            ..
        } => StreamKind::Seqpacket,
        _ => StreamKind::Socket,
    };
    Ok(Stream::new(fd, kind, addr.to_string()))
}

fn unix_bind(addr: &Addr, path: &Path, backlog: u32) -> Result<OwnedFd> {
    let label = addr.to_string();
    if addr.options.unlink {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let l = UnixListener::bind(path).map_err(|source| Error::Bind {
        addr: label.clone(),
        source,
    })?;
    let fd = OwnedFd::from(l);
    if backlog != DEFAULT_BACKLOG {
        sys::listen(fd.as_fd(), backlog).map_err(|source| Error::Bind {
            addr: label,
            source,
        })?;
    }
    Ok(fd)
}

fn hvsock_connect(addr: &Addr, uds: &Path, port: u32) -> Result<Stream> {
    let label = addr.to_string();
    let timeout = addr
        .options
        .connect_timeout
        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    let start = Instant::now();
    let mut hs: Handshake<hybrid::ConnectReply> = Handshake::new(start, timeout);
    // The deadline covers connecting too: a VMM whose listen queue is full never accepts.
    let mut s = unix_connect_by(uds, start + timeout).map_err(|e| connect_error(&label, e))?;
    let hs_err = |source| Error::Handshake {
        addr: label.clone(),
        source,
    };
    let io_err = |source| Error::Connect {
        addr: label.clone(),
        source,
    };
    s.write_all(&hybrid::ConnectRequest { port }.encode())
        .map_err(io_err)?;
    let mut chunk = [0u8; 256];
    loop {
        hs.check_deadline(Instant::now()).map_err(hs_err)?;
        let Some(left) = hs.remaining(Instant::now()) else {
            return Err(hs_err(HandshakeError::TimedOut { after: timeout }));
        };
        s.set_read_timeout(Some(left)).map_err(io_err)?;
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            if let Err(HandshakeError::Closed { partial_len: 0 }) = hs.eof() {
                // Firecracker and Cloud Hypervisor close the connection when
                // the guest does not accept.
                return Err(Error::Refused {
                    addr: label,
                    why: "the VMM closed the connection (nothing listens on that guest port?)",
                });
            }
            hs.eof().map_err(hs_err)?;
        }
        if hs.push(&chunk[..n]).map_err(hs_err)?.is_some() {
            s.set_read_timeout(None).map_err(io_err)?;
            let mut st = finish_socket(addr, s.into())?;
            st.prefix = hs.take_leftover();
            return Ok(st);
        }
    }
}

fn vport_open(addr: &Addr, path: &Path, timeout: Option<Duration>) -> Result<Stream> {
    use std::os::unix::fs::OpenOptionsExt;
    let label = addr.to_string();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::NoSuchPort {
                    path: path.to_path_buf(),
                    available: list_vports(),
                }
            } else {
                Error::Connect {
                    addr: label.clone(),
                    source,
                }
            }
        })?;
    let fd = OwnedFd::from(f);
    // The port reports POLLHUP until the host side is open (QEMU's chardev
    // has a client). The device gives no other signal, so poll with a
    // backoff from 5 ms to 100 ms, bounded by the connect timeout.
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        let rev = sys::poll_one(fd.as_fd(), libc::POLLOUT, 0).map_err(|source| Error::Connect {
            addr: label.clone(),
            source,
        })?;
        if rev & libc::POLLHUP == 0 {
            break;
        }
        if let Some(t) = timeout {
            if start.elapsed() >= t {
                return Err(Error::Timeout {
                    addr: label,
                    after: t,
                });
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
    sys::set_nonblocking(fd.as_fd(), false).map_err(|source| Error::Connect {
        addr: label.clone(),
        source,
    })?;
    Ok(Stream::new(fd, StreamKind::Device, label))
}

/// The names under /dev/virtio-ports, for error messages.
fn list_vports() -> String {
    let mut names: Vec<String> = std::fs::read_dir(crate::addr::VPORT_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Whether something listens on the Unix socket at `path`: one connect that does not wait (a
/// listener whose queue is full counts as listening). Refused or missing: `false`; any other
/// failure is an error.
pub fn unix_listened_on(path: &Path) -> io::Result<bool> {
    match unix_connect_by(path, Instant::now()) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The local vsock CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`):
/// 1 with only the loopback transport, the guest's CID in a guest, 2 on a host.
pub fn local_cid() -> io::Result<u32> {
    sys::local_cid()
}
