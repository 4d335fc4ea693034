//! Thin, checked wrappers over the few system calls `std` does not cover:
//! `AF_VSOCK` sockets and their options, `accept4`, `shutdown`, raw
//! `read`/`write` on an owned descriptor, and `splice`.
//!
//! Every descriptor is created with `SOCK_CLOEXEC`/`O_CLOEXEC` and handed out
//! as an [`OwnedFd`] at once, so nothing leaks and nothing is closed twice.
//! Nothing here allocates or logs; errors are plain [`io::Error`]s, and the
//! layer above adds what was being attempted.

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `AF_VSOCK` socket-option level.
const SOL_VSOCK: libc::c_int = libc::AF_VSOCK;
/// `SO_VM_SOCKETS_BUFFER_SIZE`, `..._MIN_SIZE`, `..._MAX_SIZE` (u64 values).
pub(crate) const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
pub(crate) const SO_VM_SOCKETS_BUFFER_MIN_SIZE: libc::c_int = 1;
pub(crate) const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;
/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`_OLD`, a `struct timeval`; on 64-bit
/// targets it is the only one).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` = `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The socket type constant for a vsock type.
pub(crate) fn sock_type(ty: crate::VsockType) -> libc::c_int {
    match ty {
        crate::VsockType::Stream => libc::SOCK_STREAM,
        crate::VsockType::Seqpacket => libc::SOCK_SEQPACKET,
        crate::VsockType::Dgram => libc::SOCK_DGRAM,
    }
}

/// `socket(AF_VSOCK, ty | SOCK_CLOEXEC, 0)`.
pub(crate) fn vsock_socket(ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a fresh
    // descriptor that nothing else owns, so OwnedFd may take it.
    let fd = cvt(unsafe { libc::socket(libc::AF_VSOCK, ty | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    sa
}

/// `bind(2)` to a vsock address.
pub(crate) fn vsock_bind(fd: BorrowedFd<'_>, cid: u32, port: u32) -> io::Result<()> {
    let sa = sockaddr_vm(cid, port);
    // SAFETY: `sa` is a valid sockaddr_vm that lives across the call and the
    // length passed is its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_vm).cast(),
            size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `connect(2)` to a vsock address (blocking unless the fd is non-blocking).
pub(crate) fn vsock_connect(fd: BorrowedFd<'_>, cid: u32, port: u32) -> io::Result<()> {
    let sa = sockaddr_vm(cid, port);
    // SAFETY: as in `vsock_bind`.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_vm).cast(),
            size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The (cid, port) of a vsock socket's own or peer address.
pub(crate) fn vsock_name(fd: BorrowedFd<'_>, peer: bool) -> io::Result<(u32, u32)> {
    // SAFETY: all-zero is a valid sockaddr_vm.
    let mut sa: libc::sockaddr_vm = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    let p = (&mut sa as *mut libc::sockaddr_vm).cast();
    // SAFETY: `p` points at a sockaddr_vm of `len` bytes that outlives the
    // call; the kernel writes at most `len` bytes.
    cvt(unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    })?;
    Ok((sa.svm_cid, sa.svm_port))
}

/// `recvfrom(2)` on a vsock datagram socket, returning the sender.
pub(crate) fn vsock_recv_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u32, u32)> {
    // SAFETY: all-zero is a valid sockaddr_vm.
    let mut sa: libc::sockaddr_vm = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `buf` is valid for writes of buf.len() bytes, `sa` for `len`
    // bytes; both outlive the call.
    let n = cvt_size(unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut sa as *mut libc::sockaddr_vm).cast(),
            &mut len,
        )
    })?;
    Ok((n, sa.svm_cid, sa.svm_port))
}

/// `sendto(2)` on a vsock datagram socket.
pub(crate) fn vsock_send_to(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    cid: u32,
    port: u32,
) -> io::Result<usize> {
    let sa = sockaddr_vm(cid, port);
    // SAFETY: `buf` is valid for reads of buf.len() bytes and `sa` is a valid
    // sockaddr_vm; both outlive the call.
    cvt_size(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            (&sa as *const libc::sockaddr_vm).cast(),
            size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })
}

/// Sets one of the `SO_VM_SOCKETS_BUFFER_*` options.
pub(crate) fn set_vsock_u64(fd: BorrowedFd<'_>, opt: libc::c_int, value: u64) -> io::Result<()> {
    // SAFETY: the option value is a u64 that lives across the call, and its
    // size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_VSOCK,
            opt,
            (&value as *const u64).cast(),
            size_of::<u64>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Reads one of the `SO_VM_SOCKETS_BUFFER_*` options.
pub(crate) fn get_vsock_u64(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (8) bytes into `value`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_VSOCK,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Sets `SO_VM_SOCKETS_CONNECT_TIMEOUT`.
pub(crate) fn set_vsock_connect_timeout(fd: BorrowedFd<'_>, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a timeval that lives across the call, with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sets `SO_SNDBUF` and `SO_RCVBUF` (Unix and TCP sockets).
pub(crate) fn set_socket_buffers(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let v: libc::c_int = size.min(i32::MAX as u64) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a c_int that lives across the call, with its size.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// The local CID, from `IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`.
pub(crate) fn local_cid() -> io::Result<u32> {
    let f = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer, which is valid for
    // the duration of the call; the fd is open.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) })?;
    Ok(cid)
}

/// `listen(2)`.
pub(crate) fn listen(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog.min(i32::MAX as u32) as libc::c_int) })
        .map(drop)
}

/// `accept4(2)` with `SOCK_CLOEXEC`.
pub(crate) fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed by accept4(2).
    let r = cvt(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor from accept4, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `read(2)`.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of buf.len() bytes during the call.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// [`read`] into memory that need not be initialised (a tokio `ReadBuf`'s unfilled part): no
/// zeroing of buffers that the kernel is about to fill anyway. Returns how many bytes of `buf`
/// are now initialised.
pub(crate) fn read_uninit(fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of buf.len() bytes during the call; the kernel writes
    // only initialised bytes, and only the first `n` it reports.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `recv(2)` with `MSG_DONTWAIT`: a non-blocking read on a descriptor that
/// is itself in blocking mode. Into possibly uninitialised memory, as [`read_uninit`].
pub(crate) fn recv_dontwait(fd: BorrowedFd<'_>, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: as for `read_uninit`.
    cvt_size(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

/// `write(2)` (`send` with `MSG_NOSIGNAL` on sockets, so a dead peer is an
/// `EPIPE` error rather than a `SIGPIPE`).
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8], socket: bool) -> io::Result<usize> {
    if socket {
        // SAFETY: `buf` is valid for reads of buf.len() bytes during the call.
        cvt_size(unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        })
    } else {
        // SAFETY: as above.
        cvt_size(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }
}

/// `shutdown(fd, SHUT_WR)`.
pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: no pointers.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// `poll(2)` on one descriptor; returns the `revents`.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: i32,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives across the call.
    cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })?;
    Ok(pfd.revents)
}

/// `pipe2(O_CLOEXEC | O_NONBLOCK)`: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: both are fresh descriptors owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Grows a pipe's capacity (`F_SETPIPE_SZ`); returns the size it got.
pub(crate) fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> io::Result<usize> {
    // SAFETY: no pointers.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) })
        .map(|n| n as usize)
}

/// `splice(2)` between two descriptors, one of which must be a pipe,
/// non-blocking and moving pages where it can.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are allowed (both ends are streams); no other pointers.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// Whether the next byte to read from a TCP socket is its urgent (out-of-band) byte
/// (`SIOCATMARK`). False for descriptors that have no mark (anything but TCP).
pub(crate) fn at_urgent_mark(fd: BorrowedFd<'_>) -> bool {
    // <asm-generic/sockios.h>; not in the libc crate.
    const SIOCATMARK: u32 = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one c_int into `at`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCATMARK as _, &mut at as *mut libc::c_int) };
    r == 0 && at != 0
}

/// The address family of a socket (`SO_DOMAIN`), e.g. `AF_VSOCK`.
pub(crate) fn socket_domain(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (4) bytes into `v`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// `dup(2)` with `FD_CLOEXEC`.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}
