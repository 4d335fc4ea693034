//! The vmlink stream multiplexer ("vmux"): many agent connections over one virtio-serial
//! port pair (a control port and an optional data port). Specified in `docs/serial-mux.md`.
//!
//! Every frame is a 20-byte little-endian header, then `len` payload bytes:
//!
//! ```text
//! offset 0  u8   type      0 HELLO, 1 OPEN, 2 ACCEPT, 3 DATA, 4 CREDIT, 5 FIN, 6 RST,
//!                          7 PING, 8 PONG
//! offset 1  [u8; 3]        zero
//! offset 4  u32  stream    the stream id (chosen by the host); HELLO: 0 start, 1 reply
//! offset 8  u32  len       payload length
//! offset 12 u64  arg       DATA: byte offset; CREDIT: bytes consumed; FIN: total length;
//!                          HELLO: the magic b"VMLKMUX1"; PING/PONG: a nonce;
//!                          OPEN/ACCEPT: the sender's receive window for the stream
//!                          (0: the default, [`WINDOW`]); otherwise 0
//! ```
//!
//! Each lane (port) starts unsynchronised: its reader discards bytes until it finds a HELLO
//! header, so a reader that starts in the middle of a frame (a restarted peer, bytes left in
//! a port buffer) recovers. This module is sans-IO: it encodes and decodes headers and
//! checks their bounds; the async engine is `vmlink_agent::mux`.

/// Header length in bytes.
pub const HEADER_LEN: usize = 20;
/// The largest DATA payload.
pub const MAX_DATA: usize = 64 * 1024;
/// The largest RST payload (a UTF-8 reason).
pub const MAX_REASON: usize = 256;
/// Bytes a sender may have unconsumed per stream and direction (the credit window) when the
/// receiver announced no window of its own: version-1 peers put 0 in OPEN's and ACCEPT's `arg`.
pub const WINDOW: u64 = 1024 * 1024;
/// The largest window a receiver may announce in OPEN's or ACCEPT's `arg`; a sender honours
/// at most this much.
pub const MAX_WINDOW: u64 = 8 * 1024 * 1024;

/// The window a sender may use for a stream whose receiver announced `announced` (OPEN's or
/// ACCEPT's `arg`): [`WINDOW`] for 0 (a version-1 peer) or less, at most [`MAX_WINDOW`].
pub fn send_window(announced: u64) -> u64 {
    announced.clamp(WINDOW, MAX_WINDOW)
}
/// HELLO's `arg`.
pub const MAGIC: [u8; 8] = *b"VMLKMUX1";

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Lane synchronisation; `stream` is 0 (start: please reply) or 1 (reply).
    Hello,
    /// Open stream `stream` (host to guest only); `arg` is the host's receive window for it.
    Open,
    /// The stream is accepted; `arg` is the guest's receive window for it.
    Accept,
    /// Payload bytes at byte offset `arg` of the stream.
    Data,
    /// The receiver has consumed `arg` bytes of the stream in total.
    Credit,
    /// The sender will send no more: the stream's length is `arg`.
    Fin,
    /// Abort the stream both ways; the payload is a reason.
    Rst,
    /// Are you there? (host to guest while streams are open); answered by PONG, same `arg`.
    Ping,
    /// The answer to PING.
    Pong,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Hello,
            1 => Kind::Open,
            2 => Kind::Accept,
            3 => Kind::Data,
            4 => Kind::Credit,
            5 => Kind::Fin,
            6 => Kind::Rst,
            7 => Kind::Ping,
            8 => Kind::Pong,
            _ => return None,
        })
    }

    fn to_u8(self) -> u8 {
        match self {
            Kind::Hello => 0,
            Kind::Open => 1,
            Kind::Accept => 2,
            Kind::Data => 3,
            Kind::Credit => 4,
            Kind::Fin => 5,
            Kind::Rst => 6,
            Kind::Ping => 7,
            Kind::Pong => 8,
        }
    }

    /// The largest payload this kind may carry.
    pub fn max_len(self) -> usize {
        match self {
            Kind::Data => MAX_DATA,
            Kind::Rst => MAX_REASON,
            _ => 0,
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The kind.
    pub kind: Kind,
    /// The stream id.
    pub stream: u32,
    /// Payload length.
    pub len: u32,
    /// Kind-specific argument.
    pub arg: u64,
}

/// A header that breaks the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Unknown type byte.
    #[error("unknown mux frame type {0}")]
    Type(u8),
    /// Reserved bytes not zero.
    #[error("mux frame reserved bytes are not zero")]
    Reserved,
    /// Payload longer than the kind allows.
    #[error("mux {kind:?} frame of {len} bytes (at most {max})")]
    TooLong {
        /// The kind.
        kind: Kind,
        /// Its length.
        len: u32,
        /// The bound.
        max: usize,
    },
    /// A DATA frame with no payload, or a HELLO with the wrong magic or flag.
    #[error("malformed mux {0:?} frame")]
    Malformed(Kind),
}

impl Header {
    /// A header.
    pub fn new(kind: Kind, stream: u32, len: u32, arg: u64) -> Header {
        Header {
            kind,
            stream,
            len,
            arg,
        }
    }

    /// A HELLO: `reply` false asks the peer to answer with a HELLO reply.
    pub fn hello(reply: bool) -> Header {
        Header::new(Kind::Hello, u32::from(reply), 0, u64::from_le_bytes(MAGIC))
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind.to_u8();
        b[4..8].copy_from_slice(&self.stream.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..20].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        let kind = Kind::from_u8(b[0]).ok_or(HeaderError::Type(b[0]))?;
        if b[1..4] != [0, 0, 0] {
            return Err(HeaderError::Reserved);
        }
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[r]);
            u32::from_le_bytes(w)
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[12..20]);
        let h = Header {
            kind,
            stream: word(4..8),
            len: word(8..12),
            arg: u64::from_le_bytes(a),
        };
        let max = kind.max_len();
        if h.len as usize > max {
            return Err(HeaderError::TooLong {
                kind,
                len: h.len,
                max,
            });
        }
        match kind {
            Kind::Data if h.len == 0 => Err(HeaderError::Malformed(kind)),
            Kind::Hello if h.arg != u64::from_le_bytes(MAGIC) || h.stream > 1 => {
                Err(HeaderError::Malformed(kind))
            }
            _ => Ok(h),
        }
    }

    /// For a HELLO: whether it is a reply.
    pub fn is_reply(&self) -> bool {
        self.stream == 1
    }
}

/// Where the first HELLO header starts in `buf`, if there is one; a reader that has lost
/// (or not yet found) frame alignment discards everything before it.
pub fn find_hello(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    (0..=buf.len() - HEADER_LEN).find(|&i| {
        buf[i] == 0
            && buf[i + 12..i + 20] == MAGIC
            && matches!(
                buf[i..i + HEADER_LEN].try_into().map(Header::decode),
                Ok(Ok(Header {
                    kind: Kind::Hello,
                    ..
                }))
            )
    })
}

/// Encodes a whole frame.
pub fn frame(h: Header, payload: &[u8]) -> Vec<u8> {
    debug_assert_eq!(h.len as usize, payload.len());
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&h.encode());
    v.extend_from_slice(payload);
    v
}

/// What a lane's byte stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One frame.
    Frame(Header, Vec<u8>),
    /// A header that breaks the format: the lane is unsynchronised again (resync on HELLO),
    /// and every stream must be reset, since any of their frames may have been lost.
    Malformed(HeaderError),
    /// Bytes discarded while looking for a HELLO.
    Skipped(usize),
}

/// Splits one lane's bytes into frames (sans-IO): [`push`](LaneDecoder::push) what was read
/// (or read straight into [`read_target`](LaneDecoder::read_target)), then take
/// [`next_event`](LaneDecoder::next_event) until it returns `None`. It starts unsynchronised:
/// bytes before the first HELLO header are skipped. It buffers at most one partial frame plus
/// the last push.
#[derive(Debug, Default)]
pub struct LaneDecoder {
    buf: Vec<u8>,
    start: usize,
    synced: bool,
    /// A frame of at least [`DIRECT_PAYLOAD`] bytes whose header has arrived but not all its
    /// payload: the rest is read into the payload's own buffer.
    partial: Option<(Header, Vec<u8>)>,
}

/// Payloads from this size on are read into their own buffer once their header is in (see
/// [`LaneDecoder::read_target`]) instead of being copied out of the lane buffer.
pub const DIRECT_PAYLOAD: usize = 4096;

impl LaneDecoder {
    /// A decoder looking for its first HELLO.
    pub fn new() -> LaneDecoder {
        LaneDecoder::default()
    }

    /// Appends bytes read from the lane.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (target, max) = self.read_target(data.len());
            let n = max.min(data.len());
            target.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Where the next bytes read from the lane go, and at most how many may go there: append
    /// them directly (e.g. tokio's `read_buf` with a `limit`), which saves the copy
    /// [`push`](Self::push) makes. While a big frame's payload is incomplete this is that
    /// payload's own buffer, limited to what it lacks, so its bytes are never copied again;
    /// otherwise the lane buffer, with room for `more`. Appending is the only allowed change.
    pub fn read_target(&mut self, more: usize) -> (&mut Vec<u8>, usize) {
        if let Some((h, payload)) = &mut self.partial {
            let lacking = h.len as usize - payload.len();
            if lacking > 0 {
                return (payload, lacking);
            }
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(more);
        (&mut self.buf, more)
    }

    /// Whether the decoder has found frame alignment.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        let partial = self
            .partial
            .as_ref()
            .map_or(0, |(_, p)| HEADER_LEN + p.len());
        self.buf.len() - self.start + partial
    }

    /// The next event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<Event> {
        if let Some((h, payload)) = &self.partial {
            if payload.len() < h.len as usize {
                return None;
            }
            let (h, payload) = self.partial.take()?;
            return Some(Event::Frame(h, payload));
        }
        let avail = &self.buf[self.start..];
        if !self.synced {
            return match find_hello(avail) {
                Some(0) => {
                    self.synced = true;
                    self.next_event()
                }
                Some(at) => {
                    self.start += at;
                    self.synced = true;
                    Some(Event::Skipped(at))
                }
                None => {
                    // Keep what could be the start of a HELLO.
                    let skip = avail.len().saturating_sub(HEADER_LEN - 1);
                    if skip == 0 {
                        return None;
                    }
                    self.start += skip;
                    Some(Event::Skipped(skip))
                }
            };
        }
        if avail.len() < HEADER_LEN {
            return None;
        }
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&avail[..HEADER_LEN]);
        match Header::decode(&hb) {
            Err(e) => {
                self.synced = false;
                self.start += 1;
                Some(Event::Malformed(e))
            }
            Ok(h) => {
                let total = HEADER_LEN + h.len as usize;
                if avail.len() < total {
                    if h.len as usize >= DIRECT_PAYLOAD {
                        // The payload's own buffer takes what is here and the rest as read.
                        let mut payload = Vec::with_capacity(h.len as usize);
                        payload.extend_from_slice(&avail[HEADER_LEN..]);
                        self.start = self.buf.len();
                        self.partial = Some((h, payload));
                    }
                    return None;
                }
                let payload = avail[HEADER_LEN..total].to_vec();
                self.start += total;
                Some(Event::Frame(h, payload))
            }
        }
    }
}

/// Invariant checks shared by the `mux_frames` fuzz target and the stable test
/// `tests/mux_invariants.rs`.
pub mod fuzzing {
    use super::*;

    fn events(data: &[u8], chunk: usize) -> (Vec<Event>, usize) {
        let mut d = LaneDecoder::new();
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            d.push(piece);
            while let Some(e) = d.next_event() {
                out.push(e);
            }
            // Bounded: at most one partial frame plus the last push.
            assert!(d.pending() <= HEADER_LEN + MAX_DATA + chunk.max(1));
        }
        // How skipped bytes are reported depends on the split; merge neighbours.
        let mut merged: Vec<Event> = Vec::new();
        for e in out {
            match (merged.last_mut(), e) {
                (Some(Event::Skipped(a)), Event::Skipped(b)) => *a += b,
                (_, e) => merged.push(e),
            }
        }
        (merged, d.pending())
    }

    /// Feeds `data` whole, in 1-byte pieces and in pieces of its first byte's size: no panic;
    /// the same events however it is split (neighbouring skips merged); every byte is accounted for (skipped, malformed
    /// by one byte, a whole frame, or pending); frames respect their kind's bounds and
    /// re-encode to the bytes they came from.
    pub fn check_mux_frames(data: &[u8]) {
        let (whole, pending) = events(data, data.len());
        let (bytes, pending1) = events(data, 1);
        let (odd, pending2) = events(data, usize::from(data.first().copied().unwrap_or(1)));
        assert_eq!(whole, bytes);
        assert_eq!(whole, odd);
        assert_eq!(pending, pending1);
        assert_eq!(pending, pending2);
        let mut at = 0usize;
        for e in &whole {
            match e {
                Event::Skipped(n) => {
                    assert!(*n > 0);
                    at += n;
                }
                Event::Malformed(err) => {
                    assert!(!err.to_string().contains('\n'));
                    at += 1;
                }
                Event::Frame(h, p) => {
                    assert!(p.len() <= h.kind.max_len());
                    assert_eq!(&data[at..at + HEADER_LEN], &h.encode());
                    assert_eq!(&data[at + HEADER_LEN..at + HEADER_LEN + p.len()], &p[..]);
                    at += HEADER_LEN + p.len();
                }
            }
        }
        assert_eq!(at + pending, data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_keeps_to_the_default_window_unless_a_bigger_one_was_announced() {
        assert_eq!(send_window(0), WINDOW, "a version-1 peer announces nothing");
        assert_eq!(send_window(1), WINDOW);
        assert_eq!(send_window(3 * WINDOW), 3 * WINDOW);
        assert_eq!(send_window(u64::MAX), MAX_WINDOW);
        // The announcement travels in `arg`, which the decoder leaves to the engine.
        let h = Header::new(Kind::Accept, 5, 0, MAX_WINDOW);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn a_big_payload_is_read_into_its_own_buffer() {
        let payload: Vec<u8> = (0..MAX_DATA).map(|i| (i % 251) as u8).collect();
        let mut wire = frame(Header::hello(false), &[]);
        wire.extend(frame(
            Header::new(Kind::Data, 3, MAX_DATA as u32, 0),
            &payload,
        ));
        wire.extend(frame(Header::new(Kind::Fin, 3, 0, MAX_DATA as u64), &[]));
        let mut d = LaneDecoder::new();
        // HELLO, then the DATA header and 100 bytes of its payload.
        d.push(&wire[..2 * HEADER_LEN + 100]);
        assert!(matches!(d.next_event(), Some(Event::Frame(h, _)) if h.kind == Kind::Hello));
        assert_eq!(d.next_event(), None);
        assert_eq!(d.pending(), HEADER_LEN + 100);
        // The rest goes into the payload's buffer, never more than it lacks.
        let mut rest = &wire[2 * HEADER_LEN + 100..];
        loop {
            let (target, max) = d.read_target(4096);
            let n = max.min(rest.len()).min(4096);
            assert!(n > 0, "the decoder wants more than the wire has");
            target.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if let Some(Event::Frame(h, p)) = d.next_event() {
                assert_eq!(h.kind, Kind::Data);
                assert!(p == payload, "the payload differs");
                break;
            }
        }
        // The FIN after it comes from the lane buffer as before.
        d.push(rest);
        assert!(matches!(d.next_event(), Some(Event::Frame(h, _)) if h.kind == Kind::Fin));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn round_trip_and_bounds() {
        for h in [
            Header::hello(false),
            Header::hello(true),
            Header::new(Kind::Open, 7, 0, 0),
            Header::new(Kind::Data, 7, MAX_DATA as u32, u64::MAX),
            Header::new(Kind::Rst, 1, 10, 0),
        ] {
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
        let mut b = Header::new(Kind::Data, 1, MAX_DATA as u32 + 1, 0).encode();
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::TooLong { .. })
        ));
        b = Header::new(Kind::Credit, 1, 1, 0).encode();
        assert!(Header::decode(&b).is_err(), "credit with payload");
        b = Header::new(Kind::Data, 1, 0, 0).encode();
        assert!(Header::decode(&b).is_err(), "empty data");
        b[0] = 9;
        assert_eq!(Header::decode(&b), Err(HeaderError::Type(9)));
        b = Header::hello(false).encode();
        b[2] = 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::Reserved));
    }

    #[test]
    fn hello_is_found_after_garbage() {
        let mut buf = vec![0u8, 3, 0, 0, 9, 9];
        buf.extend_from_slice(&Header::new(Kind::Data, 1, 4, 0).encode()[..11]);
        let at = buf.len();
        buf.extend_from_slice(&Header::hello(true).encode());
        buf.extend_from_slice(b"rest");
        assert_eq!(find_hello(&buf), Some(at));
        assert_eq!(find_hello(&buf[..at + HEADER_LEN - 1]), None);
        let mut d = LaneDecoder::new();
        d.push(&buf);
        assert_eq!(d.next_event(), Some(Event::Skipped(at)));
        assert!(matches!(d.next_event(), Some(Event::Frame(h, _)) if h.kind == Kind::Hello));
        assert_eq!(d.next_event(), None, "'rest' is not a whole header");
        assert_eq!(d.pending(), 4);
        fuzzing::check_mux_frames(&buf);
    }
}
