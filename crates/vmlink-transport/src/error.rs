//! The transport layer's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong opening, accepting or configuring a channel. Messages are
/// one sentence naming the address; the OS cause is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address string did not parse.
    #[error(transparent)]
    Addr(#[from] crate::AddrError),
    /// connect(2) (or open(2) for a device) failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nothing accepted the connection.
    #[error("connection to {addr} refused: {why}")]
    Refused {
        /// The address.
        addr: String,
        /// Which side said no, in words.
        why: &'static str,
    },
    /// The connect timeout ran out.
    #[error("timed out after {}ms connecting to {addr}", after.as_millis())]
    Timeout {
        /// The address.
        addr: String,
        /// How long we waited.
        after: Duration,
    },
    /// bind(2) or listen(2) failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// accept(2) failed.
    #[error("cannot accept on {addr}")]
    Accept {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A socket option could not be set.
    #[error("cannot set {option} on {addr}")]
    SetOption {
        /// The address.
        addr: String,
        /// The option's name in the address grammar.
        option: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `AF_VSOCK` is missing from this kernel, or no transport is loaded.
    #[error(
        "{addr}: AF_VSOCK is not available here (in a guest load \
         vmw_vsock_virtio_transport, or vsock_loopback for CID 1)"
    )]
    NoVsock {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The loaded vsock transports do not do datagrams.
    #[error(
        "{addr}: no loaded vsock transport supports datagrams \
         (virtio-vsock and vsock_loopback have none; VMCI and Hyper-V do)"
    )]
    DgramUnsupported {
        /// The address.
        addr: String,
    },
    /// The hybrid vsock `CONNECT`/`OK` exchange failed.
    #[error("hybrid vsock handshake with {addr} failed")]
    Handshake {
        /// The address.
        addr: String,
        /// What the parser or the peer did.
        #[source]
        source: vmlink_proto::hybrid::HandshakeError,
    },
    /// A virtio-serial port that is not there.
    #[error("virtio-serial port {} does not exist (ports here: {available})", path.display())]
    NoSuchPort {
        /// The device path tried.
        path: PathBuf,
        /// The names under /dev/virtio-ports, comma-separated, or `none`.
        available: String,
    },
    /// The address is of the wrong direction for the call.
    #[error("{addr} is {what}")]
    WrongDirection {
        /// The address.
        addr: String,
        /// E.g. "a listening address; connect needs a connecting one".
        what: &'static str,
    },
    /// A host name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// Other I/O on an established channel.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
