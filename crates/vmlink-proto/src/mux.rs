//! The vmlink stream multiplexer ("vmux"): many agent connections over one virtio-serial
//! port pair (a control port and an optional data port). Specified in `docs/serial-mux.md`.
//!
//! Every frame is a 20-byte little-endian header, then `len` payload bytes:
//!
//! ```text
//! offset 0  u8   type      0 HELLO, 1 OPEN, 2 ACCEPT, 3 DATA, 4 CREDIT, 5 FIN, 6 RST
//! offset 1  [u8; 3]        zero
//! offset 4  u32  stream    the stream id (chosen by the host); HELLO: 0 start, 1 reply
//! offset 8  u32  len       payload length
//! offset 12 u64  arg       DATA: byte offset; CREDIT: bytes consumed; FIN: total length;
//!                          HELLO: the magic b"VMLKMUX1"; otherwise 0
//! ```
//!
//! Each lane (port) starts unsynchronised: its reader discards bytes until it finds a HELLO
//! header, so a reader that starts in the middle of a frame (a restarted peer, bytes left in
//! a port buffer) recovers. This module is sans-IO: it encodes and decodes headers and
//! checks their bounds; the async engine is `vmlink_agent::mux`.

/// Header length in bytes.
pub const HEADER_LEN: usize = 20;
/// The largest DATA payload.
pub const MAX_DATA: usize = 32 * 1024;
/// The largest RST payload (a UTF-8 reason).
pub const MAX_REASON: usize = 256;
/// Bytes a sender may have unconsumed per stream and direction (the credit window).
pub const WINDOW: u64 = 1024 * 1024;
/// HELLO's `arg`.
pub const MAGIC: [u8; 8] = *b"VMLKMUX1";

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Lane synchronisation; `stream` is 0 (start: please reply) or 1 (reply).
    Hello,
    /// Open stream `stream` (host to guest only).
    Open,
    /// The stream is accepted.
    Accept,
    /// Payload bytes at byte offset `arg` of the stream.
    Data,
    /// The receiver has consumed `arg` bytes of the stream in total.
    Credit,
    /// The sender will send no more: the stream's length is `arg`.
    Fin,
    /// Abort the stream both ways; the payload is a reason.
    Rst,
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
