//! The `vmlink bench` wire protocol: fixed 9-byte requests, sans-IO.
//!
//! One connection carries a sequence of tests, so the same protocol works
//! over a virtio-serial port (one stream, no new connections) as over a
//! socket. The client sends a [`Request`]; then:
//!
//! | op  | request       | then                                                        |
//! |-----|---------------|-------------------------------------------------------------|
//! | `U` | upload N      | client sends N bytes; server answers 8 bytes: N received, LE |
//! | `D` | download N    | server sends N bytes                                        |
//! | `L` | latency N     | N times: client sends 1 byte, server echoes it              |
//! | `Q` | quit          | server closes                                               |
//!
//! Each request and each 8-byte answer is written in one `write`, so on a
//! seqpacket socket it is one record. Data is written in records of at most
//! [`MAX_RECORD`] bytes, which fits the default vsock buffer (a seqpacket
//! record larger than the peer's buffer fails with `EMSGSIZE`). Requests
//! larger than [`MAX_BYTES`] are refused: a client cannot make a server
//! loop for ever.

/// Length of an encoded [`Request`].
pub const REQUEST_LEN: usize = 9;
/// Largest record a bench peer writes.
pub const MAX_RECORD: usize = 64 * 1024;
/// Largest N a server accepts for `U` and `D` (1 TiB), and for `L` (10^7).
pub const MAX_BYTES: u64 = 1 << 40;
/// Largest round-trip count a server accepts.
pub const MAX_ROUND_TRIPS: u64 = 10_000_000;

/// One bench request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The client will send this many bytes.
    Upload(u64),
    /// The server shall send this many bytes.
    Download(u64),
    /// This many 1-byte echoes.
    Latency(u64),
    /// End of the session.
    Quit,
}

/// A request the server will not serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BenchError {
    /// Unknown operation byte.
    #[error("unknown bench operation byte {op:#04x} (expected U, D, L or Q)")]
    UnknownOp {
        /// The byte received.
        op: u8,
    },
    /// N over the bound.
    #[error("bench request for {n} exceeds the limit of {max}")]
    TooLarge {
        /// The N asked for.
        n: u64,
        /// The bound.
        max: u64,
    },
}

impl Request {
    /// The 9 bytes on the wire.
    pub fn encode(self) -> [u8; REQUEST_LEN] {
        let (op, n) = match self {
            Request::Upload(n) => (b'U', n),
            Request::Download(n) => (b'D', n),
            Request::Latency(n) => (b'L', n),
            Request::Quit => (b'Q', 0),
        };
        let mut b = [0u8; REQUEST_LEN];
        b[0] = op;
        b[1..].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// Parses a request from the start of `buf`: `Ok(None)` when fewer than
    /// [`REQUEST_LEN`] bytes are there yet.
    pub fn parse(buf: &[u8]) -> Result<Option<Request>, BenchError> {
        let Some(frame) = buf.get(..REQUEST_LEN) else {
            return Ok(None);
        };
        let mut n = [0u8; 8];
        n.copy_from_slice(&frame[1..]);
        let n = u64::from_le_bytes(n);
        let check = |max: u64| {
            if n > max {
                Err(BenchError::TooLarge { n, max })
            } else {
                Ok(n)
            }
        };
        Ok(Some(match frame[0] {
            b'U' => Request::Upload(check(MAX_BYTES)?),
            b'D' => Request::Download(check(MAX_BYTES)?),
            b'L' => Request::Latency(check(MAX_ROUND_TRIPS)?),
            b'Q' => Request::Quit,
            op => return Err(BenchError::UnknownOp { op }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Upload(0),
            Request::Download(1 << 30),
            Request::Latency(1000),
            Request::Quit,
        ] {
            assert_eq!(Request::parse(&r.encode()), Ok(Some(r)));
        }
    }

    #[test]
    fn short_buffer_is_incomplete() {
        let b = Request::Upload(5).encode();
        for i in 0..REQUEST_LEN {
            assert_eq!(Request::parse(&b[..i]), Ok(None));
        }
    }

    #[test]
    fn unknown_op_and_oversized_requests_are_refused() {
        let mut b = Request::Upload(5).encode();
        b[0] = b'X';
        assert_eq!(Request::parse(&b), Err(BenchError::UnknownOp { op: b'X' }));
        let b = Request::Download(MAX_BYTES + 1).encode();
        assert!(matches!(
            Request::parse(&b),
            Err(BenchError::TooLarge { .. })
        ));
        let b = Request::Latency(MAX_ROUND_TRIPS + 1).encode();
        assert!(matches!(
            Request::parse(&b),
            Err(BenchError::TooLarge { .. })
        ));
    }
}
