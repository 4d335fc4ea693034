//! The hybrid vsock handshake: `CONNECT <port>\n`, answered by `OK <port>\n`.
//!
//! # The convention
//!
//! A VMM with a "hybrid" vsock device (Firecracker, Cloud Hypervisor, vhost-device-vsock, and
//! vmlink's own device) does not expose `AF_VSOCK` on the host. It bridges guest vsock ports to
//! Unix sockets instead:
//!
//! - **Host to guest.** The VMM listens on one Unix socket, `uds_path`. A host process connects to
//!   it and writes one line, `CONNECT <port>\n`, naming the guest vsock port. The VMM asks the
//!   guest to accept; once the guest has, the VMM writes `OK <host_port>\n`, where `<host_port>`
//!   is the host-side port the VMM assigned to this connection (the port the guest sees as its
//!   peer). If the guest refuses, the VMM closes the Unix connection without a reply. After the
//!   `OK` line the stream carries raw bytes in both directions.
//! - **Guest to host.** When a guest connects to host port `P`, the VMM connects to a Unix socket
//!   at `<uds_path>_<P>` (see [`host_listener_path`]) that a host process must already be
//!   listening on. There is no handshake line on that path: the stream is raw from the start.
//!
//! This module implements both lines as separate types, one per direction: [`ConnectRequest`]
//! (host process to VMM) and [`ConnectReply`] (VMM to host process). The VMM side parses
//! requests with [`parse_request`]; the host side parses replies with [`parse_reply`].
//!
//! # Grammar: strict and canonical
//!
//! ```text
//! request = "CONNECT" SP port LF      ; exactly "CONNECT", upper case, one space
//! reply   = "OK" SP port LF
//! port    = "0" / (%x31-39 0*9DIGIT)  ; decimal, no sign, no leading zeros, value <= 4294967295
//! ```
//!
//! There is no tolerance: no `\r` before the `\n`, no lower case, no extra or trailing
//! whitespace, no `+`, no leading zeros. Firecracker, Cloud Hypervisor and vhost-device-vsock
//! accept some of those as a VMM (they compare the command case-insensitively and split on
//! whitespace); every one of them *sends* exactly the canonical form, and so does vmlink. Being
//! strict makes the encoding canonical: a parsed line re-encodes to exactly the bytes it was
//! parsed from, which the fuzz target checks. A client that sends `connect 52\r\n` gets an error
//! that shows the expected form and what it sent, rather than a guess.
//!
//! # Bounds
//!
//! Everything here is bounded, because the bytes come from a peer:
//!
//! - **Length.** A line may be at most [`MAX_LINE_LEN`] (32) bytes including its `\n`. The longest
//!   valid line, `CONNECT 4294967295\n`, is 19 bytes; 32 leaves room for a readable error about a
//!   slightly wrong line and matches the 32-byte command buffer of Firecracker and Cloud
//!   Hypervisor, so no line one of them accepts for length is refused here for length. Once
//!   32 bytes have arrived without a `\n`, the parsers return [`HandshakeError::LineTooLong`] at
//!   once rather than waiting for more.
//! - **Time.** A [`Handshake`] carries a timeout from its start ([`DEFAULT_TIMEOUT`] is 5 s; the
//!   caller chooses). This module has no clock: the I/O layer passes `now` to
//!   [`Handshake::check_deadline`] and uses [`Handshake::remaining`] as its read timeout. A peer
//!   that sends half a line and stalls costs one buffer of 32 bytes until the deadline, never a
//!   spinning or blocked thread.
//!
//! # Parsing: check, then parse, independent of how the bytes were split
//!
//! Like mini-redis's frames, [`parse_request`] and [`parse_reply`] first look for the end of the
//! line within the first [`MAX_LINE_LEN`] bytes. Without it they return [`Parsed::Incomplete`] (or
//! `LineTooLong` when the window is full); with it they judge the whole line and return the value
//! and the number of bytes consumed, `\n` included. A line is never judged before its `\n` has
//! arrived, so the outcome (the value, or the exact error) depends only on the bytes, never on how
//! they were split into reads. The fuzz target and the tests check that for every split.
//!
//! Bytes after the `\n` are not part of the handshake: they are the first bytes of the data stream
//! (a guest that accepts and writes at once can put them in the same segment as the `OK`).
//! [`Handshake`] keeps them, and [`Handshake::take_leftover`] hands them back.
//!
//! # Driving a handshake
//!
//! ```
//! use std::time::Instant;
//! use vmlink_proto::hybrid::{ConnectReply, Handshake, DEFAULT_TIMEOUT};
//!
//! // What a VMM might send back, arriving in three reads: the reply, then guest data.
//! let reads: [&[u8]; 3] = [b"OK 10", b"73\nhel", b"lo"];
//!
//! let mut handshake = Handshake::<ConnectReply>::new(Instant::now(), DEFAULT_TIMEOUT);
//! let mut reply = None;
//! for bytes in reads {
//!     // A real I/O layer would call `handshake.check_deadline(Instant::now())?`, then read
//!     // with `handshake.remaining(Instant::now())` as its timeout, and on a read of 0 bytes
//!     // return `handshake.eof()`.
//!     if let Some(value) = handshake.push(bytes)? {
//!         reply = Some(value);
//!     }
//! }
//! assert_eq!(reply, Some(ConnectReply { port: 1073 }));
//! assert_eq!(handshake.take_leftover(), b"hello");
//! # Ok::<(), vmlink_proto::hybrid::HandshakeError>(())
//! ```

use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest handshake line accepted, in bytes, counting the terminating `\n`.
///
/// The longest valid line is `CONNECT 4294967295\n` (19 bytes). 32 matches the command buffer of
/// Firecracker and Cloud Hypervisor.
pub const MAX_LINE_LEN: usize = 32;

/// The handshake timeout vmlink uses unless the caller chooses another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The host-to-VMM line, `CONNECT <port>\n`: connect me to guest vsock port `port`.
///
/// `Display` shows the line without its `\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectRequest {
    /// The guest vsock port to connect to.
    pub port: u32,
}

/// The VMM-to-host line, `OK <port>\n`: the guest accepted.
///
/// `port` is the host-side port the VMM assigned to this connection, the one the guest sees as its
/// peer's port. `Display` shows the line without its `\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectReply {
    /// The host-side port the VMM assigned to the connection.
    pub port: u32,
}

impl ConnectRequest {
    /// The wire form, `CONNECT <port>\n`.
    pub fn encode(&self) -> Vec<u8> {
        encode_line(self)
    }
}

impl ConnectReply {
    /// The wire form, `OK <port>\n`.
    pub fn encode(&self) -> Vec<u8> {
        encode_line(self)
    }
}

impl fmt::Display for ConnectRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CONNECT {}", self.port)
    }
}

impl fmt::Display for ConnectReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OK {}", self.port)
    }
}

/// Which of the two handshake lines a parser expected; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    /// `CONNECT <port>\n`, host process to VMM.
    Request,
    /// `OK <port>\n`, VMM to host process.
    Reply,
}

impl LineKind {
    /// The line's grammar as shown in messages, with `\n` spelled out: `CONNECT <port>\n`.
    pub const fn grammar(self) -> &'static str {
        match self {
            LineKind::Request => "CONNECT <port>\\n",
            LineKind::Reply => "OK <port>\\n",
        }
    }

    const fn prefix(self) -> &'static [u8] {
        match self {
            LineKind::Request => b"CONNECT ",
            LineKind::Reply => b"OK ",
        }
    }
}

impl fmt::Display for LineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.grammar())
    }
}

/// The result of a parser that may need more bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// No `\n` yet, and fewer than [`MAX_LINE_LEN`] bytes: call again with more.
    Incomplete,
    /// A whole line. `consumed` counts its bytes including the `\n`; the bytes after it belong to
    /// the data stream.
    Complete {
        /// The parsed line.
        value: T,
        /// How many bytes of the buffer the line took, `\n` included (at most [`MAX_LINE_LEN`]).
        consumed: usize,
    },
}

/// Why a handshake failed. In every case the connection is unusable and should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// [`MAX_LINE_LEN`] bytes arrived without a `\n`.
    #[error("handshake line has no `\\n` within its first {max} bytes")]
    LineTooLong {
        /// The limit, [`MAX_LINE_LEN`].
        max: usize,
    },
    /// The line does not start with the expected command and its space.
    #[error("expected `{expected}`, got `{got}`")]
    BadCommand {
        /// The line that was expected.
        expected: LineKind,
        /// The line received, without its `\n`, non-printable bytes escaped (`\r`, `\x00`). It is
        /// shorter than [`MAX_LINE_LEN`] bytes before escaping, so it needs no further truncation.
        got: String,
    },
    /// The command was right but the port is not a canonical decimal `u32`.
    #[error(
        "expected `{expected}` with <port> a decimal number from 0 to 4294967295 \
         without sign, spaces or leading zeros, got port `{got}`"
    )]
    BadPort {
        /// The line that was expected.
        expected: LineKind,
        /// What followed the command's space, without the `\n`, escaped as in `BadCommand`.
        got: String,
    },
    /// The line did not complete before the handshake's deadline.
    #[error("handshake did not complete within {after:?}")]
    TimedOut {
        /// The handshake's timeout.
        after: Duration,
    },
    /// The peer closed its side before completing the line.
    ///
    /// For a host process waiting for `OK`, `partial_len == 0` is how a VMM reports that the
    /// guest refused the connection (or that nothing listens on the guest port).
    #[error("peer closed the connection before completing the handshake line ({partial_len} bytes received)")]
    Closed {
        /// How many bytes of the unfinished line had arrived.
        partial_len: usize,
    },
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ConnectRequest {}
    impl Sealed for super::ConnectReply {}
}

/// One of the two handshake lines, [`ConnectRequest`] or [`ConnectReply`]. Sealed.
///
/// It lets [`Handshake`] and the parsers be written once for both directions.
pub trait HandshakeLine: sealed::Sealed + Copy + Eq + fmt::Debug + fmt::Display {
    /// Which line this is.
    const KIND: LineKind;
    /// Builds the line from its port.
    fn from_port(port: u32) -> Self;
    /// The line's port.
    fn port(&self) -> u32;
}

impl HandshakeLine for ConnectRequest {
    const KIND: LineKind = LineKind::Request;
    fn from_port(port: u32) -> Self {
        ConnectRequest { port }
    }
    fn port(&self) -> u32 {
        self.port
    }
}

impl HandshakeLine for ConnectReply {
    const KIND: LineKind = LineKind::Reply;
    fn from_port(port: u32) -> Self {
        ConnectReply { port }
    }
    fn port(&self) -> u32 {
        self.port
    }
}

/// Parses a `CONNECT <port>\n` line from the start of `buf`.
///
/// Returns [`Parsed::Incomplete`] while `buf` holds fewer than [`MAX_LINE_LEN`] bytes and no `\n`,
/// and [`HandshakeError::LineTooLong`] as soon as it holds that many without one. Bytes after the
/// `\n` are not looked at.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<ConnectRequest>, HandshakeError> {
    parse_line(buf)
}

/// Parses an `OK <port>\n` line from the start of `buf`; otherwise as [`parse_request`].
pub fn parse_reply(buf: &[u8]) -> Result<Parsed<ConnectReply>, HandshakeError> {
    parse_line(buf)
}

/// The path of the Unix socket a host process listens on to accept guest connections to host
/// vsock port `port`: `<uds_path>_<port>`, e.g. `/run/vm.sock_1234`.
///
/// The name is built byte-wise, so `uds_path` need not be UTF-8. Note that Unix socket paths are
/// limited to 107 bytes on Linux; checking that is the caller's job when it binds.
pub fn host_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// The one parser behind [`parse_request`] and [`parse_reply`]: find the line, then judge it.
pub(crate) fn parse_line<T: HandshakeLine>(buf: &[u8]) -> Result<Parsed<T>, HandshakeError> {
    let window = &buf[..buf.len().min(MAX_LINE_LEN)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE_LEN {
            Err(HandshakeError::LineTooLong { max: MAX_LINE_LEN })
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = &window[..newline];
    let expected = T::KIND;
    let Some(digits) = line.strip_prefix(expected.prefix()) else {
        return Err(HandshakeError::BadCommand {
            expected,
            got: printable(line),
        });
    };
    let port = parse_port(digits).ok_or_else(|| HandshakeError::BadPort {
        expected,
        got: printable(digits),
    })?;
    Ok(Parsed::Complete {
        value: T::from_port(port),
        consumed: newline + 1,
    })
}

/// `port = "0" / (%x31-39 0*9DIGIT)`, value at most `u32::MAX`.
fn parse_port(digits: &[u8]) -> Option<u32> {
    let canonical = match digits {
        [] => false,
        [_] => true,
        [first, ..] => *first != b'0',
    };
    if !canonical {
        return None;
    }
    digits.iter().try_fold(0u32, |port, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        port.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })
}

/// Peer bytes made safe to show in a message: printable ASCII as is, the rest escaped.
fn printable(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

pub(crate) fn encode_line<T: HandshakeLine>(line: &T) -> Vec<u8> {
    let mut out = line.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Where a [`Handshake`] is.
#[derive(Debug)]
enum State {
    /// Collecting the line; the buffer holds its first bytes (fewer than `MAX_LINE_LEN`).
    Reading,
    /// The line was parsed; the buffer holds the data-stream bytes that followed it.
    Complete,
    /// The line was rejected; every further `push` returns the same error.
    Failed(HandshakeError),
}

/// Collects one handshake line across any number of reads, keeps what follows it, and keeps
/// the deadline.
///
/// Use `Handshake<ConnectRequest>` on the VMM side and `Handshake<ConnectReply>` on the host-process
/// side. The type holds no socket and no clock: the caller pushes the bytes it read and passes
/// `now`. It never holds more than [`MAX_LINE_LEN`] bytes of line.
#[derive(Debug)]
pub struct Handshake<T> {
    /// The partial line while reading; the leftover data once complete.
    buf: Vec<u8>,
    state: State,
    started: Instant,
    timeout: Duration,
    line: PhantomData<fn() -> T>,
}

impl<T: HandshakeLine> Handshake<T> {
    /// Starts a handshake at `now` that must complete within `timeout`
    /// (usually [`DEFAULT_TIMEOUT`]).
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Handshake {
            buf: Vec::with_capacity(MAX_LINE_LEN),
            state: State::Reading,
            started: now,
            timeout,
            line: PhantomData,
        }
    }

    /// Adds bytes read from the peer.
    ///
    /// Returns `Ok(Some(line))` exactly once, when the `\n` arrives; `Ok(None)` while more bytes
    /// are needed. After completion, further bytes are data and are appended to the leftover
    /// (returning `Ok(None)`). After an error, every call returns that error again.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<T>, HandshakeError> {
        match &self.state {
            State::Reading => {}
            State::Complete => {
                self.buf.extend_from_slice(bytes);
                return Ok(None);
            }
            State::Failed(error) => return Err(error.clone()),
        }
        // Take no more than fits in the line window; the rest can only be leftover.
        let room = MAX_LINE_LEN.saturating_sub(self.buf.len());
        let (head, tail) = bytes.split_at(bytes.len().min(room));
        self.buf.extend_from_slice(head);
        match parse_line::<T>(&self.buf) {
            Ok(Parsed::Incomplete) => {
                // Incomplete means the window is not full, so all of `bytes` fitted.
                debug_assert!(tail.is_empty());
                Ok(None)
            }
            Ok(Parsed::Complete { value, consumed }) => {
                self.buf.drain(..consumed);
                self.buf.extend_from_slice(tail);
                self.state = State::Complete;
                Ok(Some(value))
            }
            Err(error) => {
                self.buf = Vec::new();
                self.state = State::Failed(error.clone());
                Err(error)
            }
        }
    }

    /// Tells the handshake that the peer closed its side (a read returned 0 bytes).
    ///
    /// Mid-line (including before the first byte) that is [`HandshakeError::Closed`]. After
    /// completion it is `Ok(())`: the end of the data stream, not a handshake failure. After an
    /// error it returns that error.
    pub fn eof(&self) -> Result<(), HandshakeError> {
        match &self.state {
            State::Reading => Err(HandshakeError::Closed {
                partial_len: self.buf.len(),
            }),
            State::Complete => Ok(()),
            State::Failed(error) => Err(error.clone()),
        }
    }

    /// Fails with [`HandshakeError::TimedOut`] if the line is still incomplete at `now` and the
    /// timeout has elapsed. Once the line is complete (or has failed) the deadline no longer
    /// applies and this returns `Ok(())`.
    pub fn check_deadline(&self, now: Instant) -> Result<(), HandshakeError> {
        match self.state {
            State::Reading if now.saturating_duration_since(self.started) >= self.timeout => {
                Err(HandshakeError::TimedOut {
                    after: self.timeout,
                })
            }
            _ => Ok(()),
        }
    }

    /// How long the I/O layer may wait for more bytes: the time left until the deadline.
    ///
    /// `None` when there is nothing left to wait for: the deadline has passed
    /// ([`check_deadline`](Self::check_deadline) then fails), or the line is complete or has
    /// failed. It never returns `Some(Duration::ZERO)`, so the value can be given as is to
    /// `set_read_timeout`, which rejects zero.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::Reading => self
                .timeout
                .checked_sub(now.saturating_duration_since(self.started))
                .filter(|left| !left.is_zero()),
            State::Complete | State::Failed(_) => None,
        }
    }

    /// Takes the bytes that followed the `\n`: the start of the data stream, to be delivered
    /// before anything read later. Empty before completion and after an earlier call.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        match self.state {
            State::Complete => std::mem::take(&mut self.buf),
            State::Reading | State::Failed(_) => Vec::new(),
        }
    }

    /// Whether the line has been parsed.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, State::Complete)
    }

    /// The timeout this handshake was started with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete<T>(value: T, consumed: usize) -> Result<Parsed<T>, HandshakeError> {
        Ok(Parsed::Complete { value, consumed })
    }

    fn bad_port(expected: LineKind, got: &str) -> HandshakeError {
        HandshakeError::BadPort {
            expected,
            got: got.to_owned(),
        }
    }

    fn bad_command(expected: LineKind, got: &str) -> HandshakeError {
        HandshakeError::BadCommand {
            expected,
            got: got.to_owned(),
        }
    }

    fn started_handshake<T: HandshakeLine>() -> (Handshake<T>, Instant) {
        let start = Instant::now();
        (Handshake::new(start, DEFAULT_TIMEOUT), start)
    }

    // --- the wire form ---

    #[test]
    fn request_encodes_as_connect_line() {
        assert_eq!(ConnectRequest { port: 52 }.encode(), b"CONNECT 52\n");
        assert_eq!(ConnectRequest { port: 52 }.to_string(), "CONNECT 52");
    }

    #[test]
    fn reply_encodes_as_ok_line() {
        assert_eq!(ConnectReply { port: 1073 }.encode(), b"OK 1073\n");
        assert_eq!(ConnectReply { port: 1073 }.to_string(), "OK 1073");
    }

    #[test]
    fn longest_lines_fit_the_bound() {
        let request = ConnectRequest { port: u32::MAX }.encode();
        assert_eq!(request, b"CONNECT 4294967295\n");
        assert!(request.len() <= MAX_LINE_LEN);
        assert!(ConnectReply { port: u32::MAX }.encode().len() <= MAX_LINE_LEN);
    }

    #[test]
    fn extreme_ports_round_trip() {
        for port in [
            0,
            1,
            9,
            10,
            52,
            65535,
            65536,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let request = ConnectRequest { port };
            let bytes = request.encode();
            assert_eq!(parse_request(&bytes), complete(request, bytes.len()));
            let reply = ConnectReply { port };
            let bytes = reply.encode();
            assert_eq!(parse_reply(&bytes), complete(reply, bytes.len()));
        }
    }

    #[test]
    fn host_listener_path_appends_underscore_and_port() {
        assert_eq!(
            host_listener_path(Path::new("/run/vm/v.sock"), 52),
            Path::new("/run/vm/v.sock_52")
        );
    }

    #[test]
    fn host_listener_path_keeps_non_utf8_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let uds = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff.sock"));
        let path = host_listener_path(uds, 0);
        assert_eq!(path.as_os_str().as_bytes(), b"/tmp/\xff.sock_0");
    }

    // --- the one-shot parsers ---

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(parse_request(b""), Ok(Parsed::Incomplete));
        assert_eq!(parse_reply(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn line_without_newline_is_incomplete_not_an_error() {
        assert_eq!(parse_request(b"CONNECT 52"), Ok(Parsed::Incomplete));
        // Even a line that is already wrong is not judged before its `\n`.
        assert_eq!(parse_request(b"HELLO"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn bytes_after_newline_are_not_consumed() {
        assert_eq!(
            parse_request(b"CONNECT 52\nGET / HTTP/1.1\r\n"),
            complete(ConnectRequest { port: 52 }, 11)
        );
        assert_eq!(
            parse_reply(b"OK 7\n\x00\xff garbage is data"),
            complete(ConnectReply { port: 7 }, 5)
        );
    }

    #[test]
    fn crlf_is_rejected_as_bad_port() {
        let error = parse_request(b"CONNECT 52\r\n");
        assert_eq!(error, Err(bad_port(LineKind::Request, "52\\r")));
        assert_eq!(
            parse_reply(b"OK 52\r\n"),
            Err(bad_port(LineKind::Reply, "52\\r"))
        );
    }

    #[test]
    fn lowercase_command_is_rejected() {
        assert_eq!(
            parse_request(b"connect 52\n"),
            Err(bad_command(LineKind::Request, "connect 52"))
        );
        assert_eq!(
            parse_reply(b"ok 52\n"),
            Err(bad_command(LineKind::Reply, "ok 52"))
        );
    }

    #[test]
    fn unknown_command_shows_expected_form_and_what_came() {
        let error = parse_request(b"HELLO\n").err();
        assert_eq!(error, Some(bad_command(LineKind::Request, "HELLO")));
        assert_eq!(
            error.map(|e| e.to_string()).unwrap_or_default(),
            "expected `CONNECT <port>\\n`, got `HELLO`"
        );
    }

    #[test]
    fn reply_parser_rejects_a_request_and_vice_versa() {
        assert_eq!(
            parse_reply(b"CONNECT 52\n"),
            Err(bad_command(LineKind::Reply, "CONNECT 52"))
        );
        assert_eq!(
            parse_request(b"OK 52\n"),
            Err(bad_command(LineKind::Request, "OK 52"))
        );
    }

    #[test]
    fn command_without_space_is_bad_command() {
        assert_eq!(
            parse_request(b"CONNECT\n"),
            Err(bad_command(LineKind::Request, "CONNECT"))
        );
        assert_eq!(
            parse_request(b"CONNECT52\n"),
            Err(bad_command(LineKind::Request, "CONNECT52"))
        );
        assert_eq!(
            parse_request(b"\n"),
            Err(bad_command(LineKind::Request, ""))
        );
    }

    #[test]
    fn empty_port_is_rejected() {
        assert_eq!(
            parse_request(b"CONNECT \n"),
            Err(bad_port(LineKind::Request, ""))
        );
        assert_eq!(parse_reply(b"OK \n"), Err(bad_port(LineKind::Reply, "")));
    }

    #[test]
    fn non_digit_port_is_rejected() {
        for (line, got) in [
            (&b"CONNECT 5a\n"[..], "5a"),
            (b"CONNECT x\n", "x"),
            (b"CONNECT -1\n", "-1"),
            (b"CONNECT +52\n", "+52"),
            (b"CONNECT 0x10\n", "0x10"),
            (b"CONNECT 1.5\n", "1.5"),
        ] {
            assert_eq!(parse_request(line), Err(bad_port(LineKind::Request, got)));
        }
    }

    #[test]
    fn whitespace_around_port_is_rejected() {
        assert_eq!(
            parse_request(b"CONNECT  52\n"),
            Err(bad_port(LineKind::Request, " 52"))
        );
        assert_eq!(
            parse_request(b"CONNECT 52 \n"),
            Err(bad_port(LineKind::Request, "52 "))
        );
        assert_eq!(
            parse_request(b"CONNECT\t52\n"),
            Err(bad_command(LineKind::Request, "CONNECT\\t52"))
        );
        assert_eq!(
            parse_request(b" CONNECT 52\n"),
            Err(bad_command(LineKind::Request, " CONNECT 52"))
        );
    }

    #[test]
    fn leading_zeros_are_rejected_but_zero_is_a_port() {
        assert_eq!(
            parse_request(b"CONNECT 052\n"),
            Err(bad_port(LineKind::Request, "052"))
        );
        assert_eq!(
            parse_request(b"CONNECT 00\n"),
            Err(bad_port(LineKind::Request, "00"))
        );
        assert_eq!(
            parse_request(b"CONNECT 0\n"),
            complete(ConnectRequest { port: 0 }, 10)
        );
    }

    #[test]
    fn port_overflowing_u32_is_rejected() {
        assert_eq!(
            parse_request(b"CONNECT 4294967296\n"),
            Err(bad_port(LineKind::Request, "4294967296"))
        );
        assert_eq!(
            parse_request(b"CONNECT 99999999999\n"),
            Err(bad_port(LineKind::Request, "99999999999"))
        );
        assert_eq!(
            parse_reply(b"OK 18446744073709551616\n"),
            Err(bad_port(LineKind::Reply, "18446744073709551616"))
        );
    }

    #[test]
    fn nul_bytes_are_rejected_and_escaped() {
        assert_eq!(
            parse_request(b"CONNECT 5\x002\n"),
            Err(bad_port(LineKind::Request, "5\\x002"))
        );
        assert_eq!(
            parse_request(b"\x00\x00\x00\n"),
            Err(bad_command(LineKind::Request, "\\x00\\x00\\x00"))
        );
        assert_eq!(
            parse_request(b"CONNECT\x0052\n"),
            Err(bad_command(LineKind::Request, "CONNECT\\x0052"))
        );
    }

    #[test]
    fn non_utf8_bytes_are_rejected_and_escaped() {
        assert_eq!(
            parse_request(b"CONNECT \xff\xfe\n"),
            Err(bad_port(LineKind::Request, "\\xff\\xfe"))
        );
    }

    #[test]
    fn line_of_exactly_max_len_is_judged() {
        // 31 bytes of line plus `\n` is the longest line still looked at.
        let mut line = b"CONNECT ".to_vec();
        line.resize(MAX_LINE_LEN - 1, b'1');
        line.push(b'\n');
        assert_eq!(line.len(), MAX_LINE_LEN);
        assert!(matches!(
            parse_request(&line),
            Err(HandshakeError::BadPort { .. })
        ));
    }

    #[test]
    fn too_long_line_fails_once_max_len_bytes_lack_a_newline() {
        let long = [b'A'; MAX_LINE_LEN];
        assert_eq!(
            parse_request(&long[..MAX_LINE_LEN - 1]),
            Ok(Parsed::Incomplete)
        );
        assert_eq!(
            parse_request(&long),
            Err(HandshakeError::LineTooLong { max: MAX_LINE_LEN })
        );
        // A `\n` just past the window does not rescue the line.
        let mut past = long.to_vec();
        past.push(b'\n');
        assert_eq!(
            parse_reply(&past),
            Err(HandshakeError::LineTooLong { max: MAX_LINE_LEN })
        );
    }

    #[test]
    fn digits_padding_a_valid_prefix_past_the_bound_are_too_long() {
        let mut line = b"CONNECT ".to_vec();
        line.resize(MAX_LINE_LEN + 10, b'0');
        assert_eq!(
            parse_request(&line),
            Err(HandshakeError::LineTooLong { max: MAX_LINE_LEN })
        );
    }

    #[test]
    fn error_messages_are_single_sentences_without_newlines() {
        let errors = [
            HandshakeError::LineTooLong { max: MAX_LINE_LEN },
            bad_command(LineKind::Request, "HELLO"),
            bad_port(LineKind::Reply, "52\\r"),
            HandshakeError::TimedOut {
                after: DEFAULT_TIMEOUT,
            },
            HandshakeError::Closed { partial_len: 3 },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(!message.contains('\n'), "{message:?}");
            assert!(!message.ends_with('.'), "{message:?}");
        }
        assert_eq!(
            HandshakeError::TimedOut {
                after: Duration::from_secs(5)
            }
            .to_string(),
            "handshake did not complete within 5s"
        );
    }

    // --- the accumulator ---

    #[test]
    fn split_at_every_offset_gives_same_line_and_leftover() {
        let wire = b"CONNECT 4294967295\nfirst data bytes";
        for cut in 0..=wire.len() {
            let (mut handshake, _) = started_handshake::<ConnectRequest>();
            let first = handshake.push(&wire[..cut]);
            let second = handshake.push(&wire[cut..]);
            let value = match (first, second) {
                (Ok(Some(v)), Ok(None)) | (Ok(None), Ok(Some(v))) => v,
                other => panic!("cut at {cut}: {other:?}"),
            };
            assert_eq!(value, ConnectRequest { port: u32::MAX }, "cut at {cut}");
            assert_eq!(
                handshake.take_leftover(),
                b"first data bytes",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn split_at_every_pair_of_offsets_gives_same_line_and_leftover() {
        let wire = b"OK 1073\nxy";
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let (mut handshake, _) = started_handshake::<ConnectReply>();
                let mut values = Vec::new();
                for chunk in [&wire[..a], &wire[a..b], &wire[b..]] {
                    if let Some(v) = handshake.push(chunk).ok().flatten() {
                        values.push(v);
                    }
                }
                assert_eq!(values, [ConnectReply { port: 1073 }], "cuts {a},{b}");
                assert_eq!(handshake.take_leftover(), b"xy", "cuts {a},{b}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_completes_on_the_newline() {
        let wire = b"CONNECT 52\n";
        let (mut handshake, _) = started_handshake::<ConnectRequest>();
        for (i, byte) in wire.iter().enumerate() {
            let result = handshake.push(std::slice::from_ref(byte));
            if i + 1 < wire.len() {
                assert_eq!(result, Ok(None), "byte {i}");
                assert!(!handshake.is_complete());
            } else {
                assert_eq!(result, Ok(Some(ConnectRequest { port: 52 })));
            }
        }
        assert!(handshake.is_complete());
        assert!(handshake.take_leftover().is_empty());
    }

    #[test]
    fn errors_do_not_depend_on_how_bytes_were_split() {
        for wire in [
            &b"connect 52\n"[..],
            b"CONNECT 52\r\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 5\x002\n",
            &[b'Z'; MAX_LINE_LEN + 3],
        ] {
            let whole = parse_request(wire);
            for cut in 0..=wire.len() {
                let (mut handshake, _) = started_handshake::<ConnectRequest>();
                let result = handshake
                    .push(&wire[..cut])
                    .and_then(|_| handshake.push(&wire[cut..]));
                assert_eq!(result.err(), whole.clone().err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn leftover_in_same_read_as_newline_is_kept() {
        let (mut handshake, _) = started_handshake::<ConnectReply>();
        assert_eq!(
            handshake.push(b"OK 1073\n\x00binary\nmore"),
            Ok(Some(ConnectReply { port: 1073 }))
        );
        assert_eq!(handshake.take_leftover(), b"\x00binary\nmore");
        assert!(handshake.take_leftover().is_empty());
    }

    #[test]
    fn large_read_containing_line_and_data_keeps_all_data() {
        let mut wire = b"CONNECT 9\n".to_vec();
        let data: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
        wire.extend_from_slice(&data);
        let (mut handshake, _) = started_handshake::<ConnectRequest>();
        assert_eq!(handshake.push(&wire), Ok(Some(ConnectRequest { port: 9 })));
        assert_eq!(handshake.take_leftover(), data);
    }

    #[test]
    fn bytes_pushed_after_completion_join_the_leftover() {
        let (mut handshake, _) = started_handshake::<ConnectReply>();
        assert_eq!(
            handshake.push(b"OK 1\nab"),
            Ok(Some(ConnectReply { port: 1 }))
        );
        assert_eq!(handshake.push(b"cd"), Ok(None));
        assert_eq!(handshake.take_leftover(), b"abcd");
    }

    #[test]
    fn leftover_is_empty_before_completion() {
        let (mut handshake, _) = started_handshake::<ConnectReply>();
        assert_eq!(handshake.push(b"OK 1"), Ok(None));
        assert!(handshake.take_leftover().is_empty());
        assert_eq!(handshake.push(b"2\n"), Ok(Some(ConnectReply { port: 12 })));
    }

    #[test]
    fn empty_push_changes_nothing() {
        let (mut handshake, _) = started_handshake::<ConnectRequest>();
        assert_eq!(handshake.push(b""), Ok(None));
        assert_eq!(
            handshake.eof(),
            Err(HandshakeError::Closed { partial_len: 0 })
        );
    }

    #[test]
    fn too_long_line_fails_without_waiting_for_more() {
        let (mut handshake, _) = started_handshake::<ConnectRequest>();
        assert_eq!(handshake.push(&[b'C'; MAX_LINE_LEN - 1]), Ok(None));
        assert_eq!(
            handshake.push(b"C"),
            Err(HandshakeError::LineTooLong { max: MAX_LINE_LEN })
        );
    }

    #[test]
    fn failed_handshake_repeats_its_error() {
        let (mut handshake, start) = started_handshake::<ConnectRequest>();
        let error = bad_command(LineKind::Request, "connect 52");
        assert_eq!(handshake.push(b"connect 52\n"), Err(error.clone()));
        assert_eq!(handshake.push(b"CONNECT 52\n"), Err(error.clone()));
        assert_eq!(handshake.eof(), Err(error));
        assert!(!handshake.is_complete());
        assert!(handshake.take_leftover().is_empty());
        assert_eq!(handshake.remaining(start), None);
    }

    #[test]
    fn eof_mid_line_reports_bytes_received() {
        let (mut handshake, _) = started_handshake::<ConnectRequest>();
        assert_eq!(handshake.push(b"CONN"), Ok(None));
        assert_eq!(handshake.push(b"ECT 5"), Ok(None));
        let error = handshake.eof().err();
        assert_eq!(error, Some(HandshakeError::Closed { partial_len: 9 }));
    }

    #[test]
    fn eof_before_any_byte_means_refused_for_a_client() {
        let (handshake, _) = started_handshake::<ConnectReply>();
        assert_eq!(
            handshake.eof(),
            Err(HandshakeError::Closed { partial_len: 0 })
        );
    }

    #[test]
    fn eof_after_completion_is_end_of_data_not_an_error() {
        let (mut handshake, _) = started_handshake::<ConnectReply>();
        assert_eq!(
            handshake.push(b"OK 3\n"),
            Ok(Some(ConnectReply { port: 3 }))
        );
        assert_eq!(handshake.eof(), Ok(()));
    }

    // --- the deadline ---

    #[test]
    fn deadline_not_reached_leaves_time_remaining() {
        let (handshake, start) = started_handshake::<ConnectRequest>();
        let now = start + Duration::from_secs(2);
        assert_eq!(handshake.check_deadline(now), Ok(()));
        assert_eq!(handshake.remaining(now), Some(Duration::from_secs(3)));
        assert_eq!(handshake.remaining(start), Some(DEFAULT_TIMEOUT));
    }

    #[test]
    fn timeout_fires_at_the_deadline_with_configured_duration() {
        let start = Instant::now();
        let timeout = Duration::from_millis(250);
        let mut handshake = Handshake::<ConnectRequest>::new(start, timeout);
        assert_eq!(handshake.push(b"CONNECT 5"), Ok(None));
        let expired = Err(HandshakeError::TimedOut { after: timeout });
        assert_eq!(handshake.check_deadline(start + timeout), expired);
        assert_eq!(
            handshake.check_deadline(start + Duration::from_secs(60)),
            expired
        );
        assert_eq!(handshake.remaining(start + timeout), None);
        assert_eq!(handshake.timeout(), timeout);
    }

    #[test]
    fn clock_before_start_counts_as_no_time_elapsed() {
        let (handshake, start) = started_handshake::<ConnectRequest>();
        let earlier = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
        assert_eq!(handshake.check_deadline(earlier), Ok(()));
        assert_eq!(handshake.remaining(earlier), Some(DEFAULT_TIMEOUT));
    }

    #[test]
    fn zero_timeout_is_expired_immediately() {
        let start = Instant::now();
        let handshake = Handshake::<ConnectReply>::new(start, Duration::ZERO);
        assert!(handshake.check_deadline(start).is_err());
        assert_eq!(handshake.remaining(start), None);
    }

    #[test]
    fn huge_timeout_does_not_overflow() {
        let start = Instant::now();
        let handshake = Handshake::<ConnectReply>::new(start, Duration::MAX);
        assert_eq!(
            handshake.check_deadline(start + Duration::from_secs(1)),
            Ok(())
        );
        assert!(handshake.remaining(start).is_some());
    }

    #[test]
    fn completed_handshake_ignores_the_deadline() {
        let (mut handshake, start) = started_handshake::<ConnectReply>();
        assert_eq!(
            handshake.push(b"OK 3\n"),
            Ok(Some(ConnectReply { port: 3 }))
        );
        let late = start + Duration::from_secs(3600);
        assert_eq!(handshake.check_deadline(late), Ok(()));
        assert_eq!(handshake.remaining(late), None);
    }
}
