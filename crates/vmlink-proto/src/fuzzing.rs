//! Invariant checks shared by the cargo-fuzz targets (`fuzz/`) and the stable-Rust tests.
//!
//! Not a public API: the functions panic when an invariant is broken, which is what a fuzzer
//! needs. Keeping one copy here means the nightly fuzzer and the CI test check the same things.

use crate::hybrid::{
    encode_line, parse_line, ConnectReply, ConnectRequest, Handshake, HandshakeError,
    HandshakeLine, Parsed, DEFAULT_TIMEOUT, MAX_LINE_LEN,
};
use std::time::Instant;

/// Longest error message the hybrid codec may produce, with every byte of `got` escaped.
const MAX_MESSAGE_LEN: usize = 256;

/// Checks every hybrid-handshake invariant on one fuzz input.
///
/// Input layout: byte 0 gives the number `n % 8` of chunk-plan bytes that follow; each plan byte
/// is a chunk length (`% (MAX_LINE_LEN + 2)`, where 0 means "push an empty slice, then one
/// byte"), used in turn to split the rest, the payload, into pushes. An empty plan pushes the
/// payload whole. The payload goes to both parsers and both accumulators.
pub fn check_hybrid(data: &[u8]) {
    let (plan, payload) = split_plan(data);
    check_line::<ConnectRequest>(payload, &plan);
    check_line::<ConnectReply>(payload, &plan);

    let mut port = [0u8; 4];
    for (slot, byte) in port.iter_mut().zip(payload) {
        *slot = *byte;
    }
    let port = u32::from_le_bytes(port);
    check_round_trip(ConnectRequest { port });
    check_round_trip(ConnectReply { port });
}

fn split_plan(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return (Vec::new(), &[]);
    };
    let count = usize::from(count % 8).min(rest.len());
    let (plan, payload) = rest.split_at(count);
    let plan = plan
        .iter()
        .map(|&b| usize::from(b) % (MAX_LINE_LEN + 2))
        .collect();
    (plan, payload)
}

/// Splits `payload` into the pushes the plan describes (empty slices included).
fn chunks<'a>(payload: &'a [u8], plan: &[usize]) -> Vec<&'a [u8]> {
    if plan.is_empty() {
        return vec![payload];
    }
    let mut out = Vec::new();
    let mut rest = payload;
    for &len in plan.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let len = if len == 0 {
            out.push(&rest[..0]);
            1
        } else {
            len
        };
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

fn check_line<T: HandshakeLine>(payload: &[u8], plan: &[usize]) {
    let whole = parse_line::<T>(payload);
    let newline = payload.iter().take(MAX_LINE_LEN).position(|&b| b == b'\n');

    // The result agrees with where the `\n` is.
    match (&whole, newline) {
        (Ok(Parsed::Incomplete), None) => assert!(payload.len() < MAX_LINE_LEN),
        (Ok(Parsed::Complete { value, consumed }), Some(at)) => {
            assert_eq!(*consumed, at + 1);
            assert!(*consumed <= payload.len());
            assert!(*consumed <= MAX_LINE_LEN);
            // Canonical grammar: re-encoding gives back exactly the consumed bytes.
            assert_eq!(encode_line(value), payload[..*consumed]);
            check_round_trip(*value);
        }
        (Err(HandshakeError::LineTooLong { max }), None) => {
            assert_eq!(*max, MAX_LINE_LEN);
            assert!(payload.len() >= MAX_LINE_LEN);
        }
        (Err(HandshakeError::BadCommand { .. } | HandshakeError::BadPort { .. }), Some(_)) => {}
        (result, newline) => panic!("{result:?} with a newline at {newline:?}"),
    }
    if let Err(error) = &whole {
        let message = error.to_string();
        assert!(!message.is_empty() && message.len() <= MAX_MESSAGE_LEN);
        assert!(!message.contains('\n'));
    }

    // Decided exactly when the `\n` (or the MAX_LINE_LEN-th byte) arrives, never earlier.
    let decided_at = newline.map_or(MAX_LINE_LEN, |at| at + 1);
    for len in 0..=payload.len().min(decided_at + 1) {
        let prefix = parse_line::<T>(&payload[..len]);
        if len < decided_at {
            assert_eq!(prefix, Ok(Parsed::Incomplete), "prefix of {len} bytes");
        } else {
            assert_eq!(prefix, whole, "prefix of {len} bytes");
        }
    }

    // The accumulator fed in chunks agrees with the one-shot parser.
    let mut handshake = Handshake::<T>::new(Instant::now(), DEFAULT_TIMEOUT);
    let mut outcome: Option<Result<T, HandshakeError>> = None;
    for chunk in chunks(payload, plan) {
        match (handshake.push(chunk), &outcome) {
            (Ok(None), _) => {}
            (Ok(Some(value)), None) => outcome = Some(Ok(value)),
            (Ok(Some(value)), Some(_)) => panic!("second value {value:?}"),
            (Err(error), None) => outcome = Some(Err(error)),
            (Err(error), Some(Err(first))) => assert_eq!(&error, first, "error changed"),
            (Err(error), Some(Ok(_))) => panic!("error {error:?} after completion"),
        }
    }
    match (outcome, whole) {
        (None, Ok(Parsed::Incomplete)) => {
            assert!(!handshake.is_complete());
            assert_eq!(
                handshake.eof(),
                Err(HandshakeError::Closed {
                    partial_len: payload.len()
                })
            );
        }
        (
            Some(Ok(value)),
            Ok(Parsed::Complete {
                value: expected,
                consumed,
            }),
        ) => {
            assert_eq!(value, expected);
            assert!(handshake.is_complete());
            assert_eq!(handshake.eof(), Ok(()));
            assert_eq!(handshake.take_leftover(), payload[consumed..]);
        }
        (Some(Err(error)), Err(expected)) => {
            assert_eq!(error, expected);
            assert_eq!(handshake.eof(), Err(expected));
            assert!(handshake.take_leftover().is_empty());
        }
        (outcome, whole) => panic!("accumulator gave {outcome:?}, one-shot parser {whole:?}"),
    }
}

/// Any value encodes within the bound and parses back to itself, consuming all of it.
pub fn check_round_trip<T: HandshakeLine>(value: T) {
    let bytes = encode_line(&value);
    assert!(bytes.len() <= MAX_LINE_LEN);
    assert_eq!(
        parse_line::<T>(&bytes),
        Ok(Parsed::Complete {
            value,
            consumed: bytes.len()
        })
    );
    assert_eq!(T::from_port(value.port()), value);
}

/// xorshift64: a tiny deterministic generator, so the stable-Rust tests
/// that run the fuzz invariants spread their inputs the same way every run.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next 64 pseudo-random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (> 0); the modulo bias does not matter here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One pseudo-random byte.
    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a [u8]]) -> &'a [u8] {
        items[self.below(items.len())]
    }
}
