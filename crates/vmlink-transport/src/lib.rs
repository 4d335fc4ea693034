//! # vmlink-transport
//!
//! One address grammar and one socket API over every host<->guest channel:
//! `AF_VSOCK` (stream, seqpacket, datagram), virtio-serial ports, Unix
//! sockets (path and abstract), hybrid vsock (`CONNECT <port>` over a VMM's
//! Unix socket), TCP and stdio.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use vmlink_transport::{Addr, Stream};
//!
//! let addr: Addr = "vsock:host:1234,connect-timeout=2s".parse()?;
//! let mut s = Stream::connect(&addr)?;
//! s.write_all(b"ping")?;
//! s.shutdown_write()?;
//! let mut answer = String::new();
//! s.read_to_string(&mut answer)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layers, bottom up (dependencies point down only):
//!
//! - [`addr`]: the grammar, pure; `FromStr` and `Display` round-trip.
//! - `sys` (private): the handful of system calls `std` lacks, each behind a
//!   safe function that returns an `OwnedFd`.
//! - [`Stream`] / [`Listener`]: the blocking core, like `std::net`.
//! - [`AsyncStream`] / [`AsyncListener`]: the tokio layer, a thin `AsyncFd`
//!   skin over the core, like `tokio::net`.
//! - [`relay`]: copies both ways between two streams with half-close, using
//!   `splice(2)` where both ends allow it.
//!
//! No type from a dependency appears in the public API except tokio's I/O
//! traits.

pub mod addr;
mod async_io;
mod error;
pub mod relay;
mod stream;
mod sys;

pub use addr::{Addr, AddrError, Cid, Endpoint, Options, VsockPort, VsockType};
pub use async_io::{AsyncListener, AsyncStream, ChunkOut, ReadHalf, WriteHalf};
pub use error::{Error, Result};
pub use stream::{
    local_cid, unix_listened_on, Listener, Stream, StreamKind, DEFAULT_BACKLOG,
    DEFAULT_HANDSHAKE_TIMEOUT,
};

/// Formats an error with its whole `source()` chain, `: `-separated, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
