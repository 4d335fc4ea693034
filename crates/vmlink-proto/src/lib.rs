//! Sans-IO protocol codecs for vmlink.
//!
//! Every parser of bytes that come from a peer (a guest, a VMM, a host client) lives here, in code
//! that never touches a socket: it takes a buffer and returns a value, `Incomplete`, or an error.
//! The I/O layers (`vmlink-transport`, the vsock device) own the sockets and the clocks and feed
//! this crate bytes and instants. That keeps each parser in one place, testable byte by byte, and
//! fuzzable (see `fuzz/` at the repository root).
//!
//! Modules:
//!
//! - [`hybrid`]: the hybrid vsock handshake (`CONNECT <port>\n` / `OK <port>\n`) used by
//!   Firecracker, Cloud Hypervisor and vhost-device-vsock to reach guest vsock ports through a
//!   Unix socket. The normative description is `docs/hybrid-vsock.md`.
//! - [`bench`](mod@bench): the fixed 9-byte requests of `vmlink bench`.
//! - [`agent`]: the guest agent's length-framed control protocol (`docs/agent-protocol.md`).
//! - [`qga`]: qemu-guest-agent's QMP-style JSON stream: framing, the 0xFF resync, request
//!   checks and answers (`docs/qga-compat.md`).
//! - [`text`]: escaping a peer's text before it is shown on a terminal.

#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod hybrid;
pub mod mux;
pub mod qga;
pub mod text;

#[doc(hidden)]
pub mod fuzzing;
