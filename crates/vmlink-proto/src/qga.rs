//! # The qemu-guest-agent wire protocol, without I/O
//!
//! qemu-ga speaks QMP's framing over a byte stream (a virtio-serial port, a Unix or vsock
//! socket): the host writes JSON objects `{"execute": NAME, "arguments": {...}, "id": ANY}`
//! back to back, with or without whitespace between them, and the agent answers each with one
//! line, `{"return": VALUE, "id": ANY}\n` or `{"error": {"class": C, "desc": D}, "id": ANY}\n`.
//! There is no length prefix: the end of an object is found by counting braces and brackets
//! outside strings, which is what QEMU's json-streamer does and what [`Decoder`] does here.
//!
//! ## Framing, as qemu-ga frames
//!
//! - A `{` or `[` opens a message; the message ends when every brace and bracket it opened is
//!   closed. A closer with nothing open is a message of its own (a parse error: "expecting
//!   value"), so `}}{...}` answers an error and then the request.
//! - A bare scalar between messages (`42`, `"s"`, `null`) is a message too; a number or keyword
//!   ends only at the next byte that cannot continue it, so a trailing `42` waits.
//! - Strings may be double- or single-quoted (QEMU's JSON accepts `'...'`); braces inside them do
//!   not count. Single-quoted strings are rewritten to double-quoted ones in the message bytes.
//! - Whitespace between messages is skipped.
//!
//! ## The 0xFF sentinel
//!
//! 0xFF never occurs in UTF-8 text. `guest-sync-delimited` uses it for resynchronisation: the
//! host sends 0xFF, which makes the agent drop whatever partial message it holds, and the
//! agent puts 0xFF before its answer, so the host can discard everything up to it. qemu-ga 7.2
//! also answers the 0xFF itself with an error (`JSON parse error, stray '\uFFFD'`), and so does
//! this decoder ([`Frame::Error`] with [`FrameError::Sentinel`]); hosts skip it because they
//! wait for the 0xFF that prefixes the sync answer.
//!
//! ## Bounds
//!
//! A message may be at most [`MAX_MESSAGE_LEN`] bytes (64 MiB, qemu's `MAX_TOKEN_SIZE`) and
//! nest at most [`MAX_NESTING`] (1024) deep. Past either bound the message is dropped, the
//! depth counts reset and an error frame is produced, as qemu does; the decoder never holds more
//! than `MAX_MESSAGE_LEN` + a few bytes. After such a reset the rest of the oversized message is
//! framed afresh (its closers become "expecting value" errors), again as in qemu.
//!
//! ## Requests and responses
//!
//! [`parse_request`] checks a framed message the way QEMU's QMP dispatcher does (an object, a
//! string `execute`, an object `arguments`, nothing else but `id`) and returns a [`Request`] or
//! the [`ErrorReply`] to send. [`encode_return`] and [`encode_error`] produce an answer line in
//! qemu-ga's layout (`", "` and `": "` separators, non-ASCII escaped as `\uXXXX`). Base64, used
//! by `guest-exec` and `guest-file-*`, is here too ([`base64_encode`], [`base64_decode`]).

use serde::Serialize;
use serde_json::{Map, Value};

/// The resynchronisation byte of `guest-sync-delimited`.
pub const SENTINEL: u8 = 0xFF;
/// The largest message, in bytes (qemu's `MAX_TOKEN_SIZE`).
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
/// The deepest nesting of braces and brackets (qemu's `MAX_NESTING`).
pub const MAX_NESTING: usize = 1024;

/// Why the decoder dropped input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A 0xFF byte: the partial message, if any, was dropped.
    #[error("JSON parse error, stray '\u{FFFD}'")]
    Sentinel,
    /// The message grew past [`MAX_MESSAGE_LEN`].
    #[error("JSON token size limit exceeded")]
    TooLong,
    /// The message nested deeper than [`MAX_NESTING`].
    #[error("JSON nesting depth limit exceeded")]
    TooDeep,
}

/// One unit of input the agent must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one JSON value (single-quoted strings rewritten), to [`parse_request`].
    Message(Vec<u8>),
    /// Input was dropped; answer with [`FrameError`]'s text as a `GenericError`.
    Error(FrameError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Start,
    /// Inside a string opened by this quote byte.
    Str { quote: u8, escape: bool },
    /// Inside a bare token (number, keyword, or junk).
    Bare,
}

/// Splits a byte stream into [`Frame`]s. Feed it bytes with [`Decoder::push`] as they arrive.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    braces: i64,
    brackets: i64,
    lex: Lex,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

fn is_bare(b: u8) -> bool {
    !matches!(
        b,
        b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"' | b'\'' | b' ' | b'\t' | b'\r' | b'\n'
    ) && b != SENTINEL
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::new(),
            braces: 0,
            brackets: 0,
            lex: Lex::Start,
        }
    }

    /// Whether a partial message is held.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.lex == Lex::Start
    }

    /// Bytes of partial message held (at most [`MAX_MESSAGE_LEN`] + 2).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.braces = 0;
        self.brackets = 0;
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        let msg = std::mem::take(&mut self.buf);
        self.braces = 0;
        self.brackets = 0;
        out.push(Frame::Message(msg));
    }

    fn open(&self) -> bool {
        self.braces != 0 || self.brackets != 0
    }

    /// A token ended: emit the message if it is complete, or an error if a bound is passed.
    fn token_done(&mut self, out: &mut Vec<Frame>) {
        if self.braces < 0 || self.brackets < 0 || !self.open() {
            self.emit(out);
        } else if self.buf.len() > MAX_MESSAGE_LEN {
            self.reset();
            out.push(Frame::Error(FrameError::TooLong));
        } else if self.braces + self.brackets > MAX_NESTING as i64 {
            self.reset();
            out.push(Frame::Error(FrameError::TooDeep));
        }
    }

    fn push_checked(&mut self, b: u8, out: &mut Vec<Frame>) {
        // A string or bare token longer than the bound is cut off here, so memory stays bounded
        // even while the token is unfinished.
        if self.buf.len() > MAX_MESSAGE_LEN {
            self.reset();
            self.lex = Lex::Start;
            out.push(Frame::Error(FrameError::TooLong));
            return;
        }
        self.buf.push(b);
    }

    /// Feeds `data`, appending every frame it completes to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if b == SENTINEL {
                self.reset();
                self.lex = Lex::Start;
                out.push(Frame::Error(FrameError::Sentinel));
                i += 1;
                continue;
            }
            match self.lex {
                Lex::Str { quote, escape } => {
                    if escape {
                        if quote == b'\'' && b == b'\'' {
                            self.push_checked(b'\'', out);
                        } else {
                            self.push_checked(b'\\', out);
                            self.push_checked(b, out);
                        }
                        if let Lex::Str { .. } = self.lex {
                            self.lex = Lex::Str {
                                quote,
                                escape: false,
                            };
                        }
                    } else if b == b'\\' {
                        self.lex = Lex::Str {
                            quote,
                            escape: true,
                        };
                    } else if b == quote {
                        self.lex = Lex::Start;
                        self.push_checked(b'"', out);
                        self.token_done(out);
                    } else if quote == b'\'' && b == b'"' {
                        self.push_checked(b'\\', out);
                        self.push_checked(b'"', out);
                    } else {
                        self.push_checked(b, out);
                    }
                    i += 1;
                }
                Lex::Bare => {
                    if is_bare(b) {
                        self.push_checked(b, out);
                        i += 1;
                    } else {
                        // The bare token ends before `b`, which is looked at again.
                        self.lex = Lex::Start;
                        self.token_done(out);
                    }
                }
                Lex::Start => {
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {
                            if self.open() {
                                self.push_checked(b, out);
                            }
                        }
                        b'{' | b'[' | b'}' | b']' => {
                            match b {
                                b'{' => self.braces += 1,
                                b'}' => self.braces -= 1,
                                b'[' => self.brackets += 1,
                                _ => self.brackets -= 1,
                            }
                            self.push_checked(b, out);
                            self.token_done(out);
                        }
                        b',' | b':' => {
                            self.push_checked(b, out);
                            self.token_done(out);
                        }
                        b'"' | b'\'' => {
                            self.push_checked(b'"', out);
                            self.lex = Lex::Str {
                                quote: b,
                                escape: false,
                            };
                        }
                        _ => {
                            self.push_checked(b, out);
                            self.lex = Lex::Bare;
                        }
                    }
                    i += 1;
                }
            }
        }
    }
}

/// The QMP error classes qemu-ga uses.
pub const GENERIC_ERROR: &str = "GenericError";
/// The class of an unknown or disabled command.
pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";

/// An error answer: `{"error": {"class": class, "desc": desc}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// The QMP error class, e.g. [`GENERIC_ERROR`].
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

impl ErrorReply {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> ErrorReply {
        ErrorReply {
            class: GENERIC_ERROR.to_string(),
            desc: desc.into(),
        }
    }
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// The arguments (an empty map when absent).
    pub arguments: Map<String, Value>,
    /// The request's `id`, echoed in the answer.
    pub id: Option<Value>,
}

/// A request that failed the checks, with the `id` to echo if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// What to answer.
    pub error: ErrorReply,
    /// The request's `id`, if it was an object with one.
    pub id: Option<Value>,
}

/// Parses and checks one framed message as QEMU's QMP dispatcher does.
pub fn parse_request(msg: &[u8]) -> Result<Request, Rejected> {
    let value: Value = serde_json::from_slice(msg).map_err(|e| Rejected {
        error: ErrorReply::generic(parse_error_desc(msg, &e)),
        id: None,
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Rejected {
            error: ErrorReply::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = obj.remove("id");
    let reject = |desc: String| Rejected {
        error: ErrorReply::generic(desc),
        id: id.clone(),
    };
    let mut execute = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("execute", Value::String(s)) => execute = Some(s),
            ("execute", _) => {
                return Err(reject("QMP input member 'execute' must be a string".into()))
            }
            ("arguments", Value::Object(m)) => arguments = m,
            ("arguments", _) => {
                return Err(reject(
                    "QMP input member 'arguments' must be an object".into(),
                ))
            }
            (other, _) => return Err(reject(format!("QMP input member '{other}' is unexpected"))),
        }
    }
    let Some(execute) = execute else {
        return Err(reject("QMP input lacks member 'execute'".into()));
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

fn parse_error_desc(msg: &[u8], e: &serde_json::Error) -> String {
    let trimmed = msg.iter().copied().find(|b| !b.is_ascii_whitespace());
    if matches!(trimmed, None | Some(b'}') | Some(b']')) {
        return "JSON parse error, expecting value".to_string();
    }
    // serde_json appends " at line L column C"; qemu's wording differs anyway (docs/qga-compat.md).
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    format!("JSON parse error, {text}")
}

/// qemu's JSON output: `", "` and `": "` separators, non-ASCII as `\uXXXX`.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() && c != '\u{7f}' {
                let mut b = [0u8; 1];
                w.write_all(c.encode_utf8(&mut b).as_bytes())?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04X}")?;
                }
            }
        }
        Ok(())
    }
}

fn to_qemu_json(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a `Value` or plain struct into a Vec cannot fail.
    if value.serialize(&mut ser).is_err() {
        out = b"null".to_vec();
    }
    out
}

/// `{"return": value[, "id": id]}\n`, prefixed with 0xFF when `delimited`.
pub fn encode_return(value: &Value, id: Option<&Value>, delimited: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if delimited {
        out.push(SENTINEL);
    }
    out.extend_from_slice(b"{\"return\": ");
    out.extend(to_qemu_json(value));
    if let Some(id) = id {
        out.extend_from_slice(b", \"id\": ");
        out.extend(to_qemu_json(id));
    }
    out.extend_from_slice(b"}\n");
    out
}

/// `{"error": {"class": .., "desc": ..}[, "id": id]}\n`.
pub fn encode_error(error: &ErrorReply, id: Option<&Value>) -> Vec<u8> {
    let mut out = b"{\"error\": {\"class\": ".to_vec();
    out.extend(to_qemu_json(&error.class));
    out.extend_from_slice(b", \"desc\": ");
    out.extend(to_qemu_json(&error.desc));
    out.push(b'}');
    if let Some(id) = id {
        out.extend_from_slice(b", \"id\": ");
        out.extend(to_qemu_json(id));
    }
    out.extend_from_slice(b"}\n");
    out
}

/// A request line as a host sends it: `{"execute": .., "arguments": ..}` (no newline).
pub fn encode_request(execute: &str, arguments: Option<&Value>, id: Option<&Value>) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("execute".into(), Value::String(execute.into()));
    if let Some(a) = arguments {
        obj.insert("arguments".into(), a.clone());
    }
    if let Some(id) = id {
        obj.insert("id".into(), id.clone());
    }
    to_qemu_json(&Value::Object(obj))
}

/// An answer, as a host reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `{"return": ..}`.
    Return(Value),
    /// `{"error": ..}`.
    Error(ErrorReply),
}

/// Parses an answer line (without the 0xFF prefix). `None` if it is neither shape.
pub fn parse_response(msg: &[u8]) -> Option<Response> {
    let Value::Object(mut obj) = serde_json::from_slice(msg).ok()? else {
        return None;
    };
    if let Some(v) = obj.remove("return") {
        return Some(Response::Return(v));
    }
    let Value::Object(mut err) = obj.remove("error")? else {
        return None;
    };
    let class = err.remove("class")?.as_str()?.to_string();
    let desc = err.remove("desc")?.as_str()?.to_string();
    Some(Response::Error(ErrorReply { class, desc }))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(char::from(B64[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Why base64 input was refused (qemu's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    /// A byte outside the alphabet, or `=` other than at the end.
    #[error("Base64 data contains invalid characters")]
    InvalidCharacters,
    /// The length is not a multiple of 4 once padded.
    #[error("Base64 data is not a multiple of 4 characters")]
    BadLength,
}

/// Strict standard base64: the alphabet, then at most two `=`, length a multiple of 4.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let bytes = text.as_bytes();
    let body_len = bytes.len() - bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if bytes.len() - body_len > 2 {
        return Err(Base64Error::InvalidCharacters);
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for &b in &bytes[..body_len] {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(Base64Error::InvalidCharacters),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bytes.len() % 4 != 0 {
        return Err(Base64Error::BadLength);
    }
    Ok(out)
}

/// Invariant checks for the `qga_stream` fuzz target and its stable-Rust test. Not an API:
/// they panic when an invariant breaks.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Checks the framing and request invariants on one input.
    ///
    /// Byte 0 gives a chunk size (`1 + b`, so 1 to 256); the rest is the stream. Invariants: no
    /// panic; the decoder never holds more than `MAX_MESSAGE_LEN + 2` bytes; the frames do not
    /// depend on how the stream is split; there is one sentinel error per 0xFF byte; no message
    /// is empty or contains 0xFF; every accepted request's answer parses back to its value;
    /// base64 round-trips.
    pub fn check_qga_stream(data: &[u8]) {
        let Some((&chunk, stream)) = data.split_first() else {
            return;
        };
        let chunk = usize::from(chunk) + 1;
        let mut whole = Vec::new();
        let mut d = Decoder::new();
        d.push(stream, &mut whole);
        assert!(d.buffered() <= MAX_MESSAGE_LEN + 2);

        let mut split = Vec::new();
        let mut d = Decoder::new();
        for part in stream.chunks(chunk) {
            d.push(part, &mut split);
            assert!(d.buffered() <= MAX_MESSAGE_LEN + 2);
        }
        assert_eq!(whole, split, "framing depends on the split");

        let sentinels = whole
            .iter()
            .filter(|f| **f == Frame::Error(FrameError::Sentinel))
            .count();
        assert_eq!(sentinels, stream.iter().filter(|&&b| b == SENTINEL).count());

        for frame in &whole {
            let Frame::Message(m) = frame else { continue };
            assert!(!m.is_empty());
            assert!(!m.contains(&SENTINEL));
            match parse_request(m) {
                Ok(req) => {
                    let value = Value::Object(req.arguments.clone());
                    let line = encode_return(&value, req.id.as_ref(), false);
                    assert_eq!(line.last(), Some(&b'\n'));
                    assert_eq!(parse_response(&line), Some(Response::Return(value)));
                }
                Err(rejected) => {
                    let line = encode_error(&rejected.error, rejected.id.as_ref());
                    assert_eq!(parse_response(&line), Some(Response::Error(rejected.error)));
                }
            }
        }
        assert_eq!(base64_decode(&base64_encode(stream)).as_deref(), Ok(stream));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.push(input, &mut out);
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_back_to_back_and_across_whitespace_are_split() {
        assert_eq!(
            frames(b"{\"a\":1}{\"b\":[1,{}]}  \n {\"c\":\"}\"}"),
            vec![
                msg("{\"a\":1}"),
                msg("{\"b\":[1,{}]}"),
                msg("{\"c\":\"}\"}")
            ]
        );
    }

    #[test]
    fn a_message_split_at_every_byte_frames_the_same() {
        let input = b"{\"execute\":\"guest-ping\",\"id\":\"a\\\"}\"} 42 ";
        let whole = frames(input);
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for b in input {
            d.push(&[*b], &mut out);
        }
        assert_eq!(out, whole);
        assert_eq!(whole.len(), 2);
    }

    #[test]
    fn stray_closers_and_scalars_frame_as_qemu_does() {
        // `42` waits for the byte that ends it; `}` with nothing open is its own message.
        assert_eq!(frames(b"42"), vec![]);
        assert_eq!(frames(b"42{}}"), vec![msg("42"), msg("{}"), msg("}")]);
    }

    #[test]
    fn the_sentinel_drops_a_partial_message_and_is_reported() {
        assert_eq!(
            frames(b"{\"execute\":\"gu\xff{\"execute\":\"guest-ping\"}"),
            vec![
                Frame::Error(FrameError::Sentinel),
                msg("{\"execute\":\"guest-ping\"}")
            ]
        );
    }

    #[test]
    fn single_quoted_strings_are_rewritten_to_double_quoted() {
        assert_eq!(
            frames(b"{'execute':'a\"b\\'c'}"),
            vec![msg("{\"execute\":\"a\\\"b'c\"}")]
        );
    }

    #[test]
    fn nesting_past_the_bound_is_an_error_and_the_rest_is_framed_afresh() {
        let mut input = vec![b'['; MAX_NESTING + 1];
        input.push(b']');
        let out = frames(&input);
        assert_eq!(out[0], Frame::Error(FrameError::TooDeep));
        assert_eq!(out[1], msg("]"));
    }

    #[test]
    fn a_message_past_the_size_bound_is_dropped_and_memory_stays_bounded() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.push(b"{\"pad\":\"", &mut out);
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..65 {
            d.push(&chunk, &mut out);
            assert!(d.buffered() <= MAX_MESSAGE_LEN + 2);
        }
        assert_eq!(out, vec![Frame::Error(FrameError::TooLong)]);
    }

    #[test]
    fn requests_are_checked_as_qmp_dispatch_does() {
        let ok = parse_request(br#"{"execute":"guest-ping","id":7}"#).expect("valid");
        assert_eq!(ok.execute, "guest-ping");
        assert_eq!(ok.id, Some(json!(7)));
        let desc = |m: &[u8]| parse_request(m).expect_err("rejected").error.desc;
        assert_eq!(desc(b"[1]"), "QMP input must be a JSON object");
        assert_eq!(
            desc(b"{\"execute\":1}"),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(b"{\"exec\":\"x\"}"),
            "QMP input member 'exec' is unexpected"
        );
        assert_eq!(
            desc(b"{\"execute\":\"x\",\"arguments\":null}"),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(desc(b"{}"), "QMP input lacks member 'execute'");
        assert_eq!(desc(b"}"), "JSON parse error, expecting value");
        let r = parse_request(br#"{"execute":1,"id":"x"}"#).expect_err("rejected");
        assert_eq!(r.id, Some(json!("x")));
    }

    #[test]
    fn answers_use_qemus_layout() {
        assert_eq!(
            encode_return(&json!({}), Some(&json!(7)), false),
            b"{\"return\": {}, \"id\": 7}\n"
        );
        assert_eq!(
            encode_return(&json!(5), None, true),
            b"\xff{\"return\": 5}\n"
        );
        assert_eq!(
            encode_error(&ErrorReply::generic("x \u{201c}y"), None),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x \\u201Cy\"}}\n"
        );
        assert_eq!(
            parse_response(b"{\"return\": [1, 2], \"id\": 1}"),
            Some(Response::Return(json!([1, 2])))
        );
    }

    #[test]
    fn base64_round_trips_and_rejects_what_qemu_rejects() {
        for len in 0..10 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data)), Ok(data));
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("!!!"), Err(Base64Error::InvalidCharacters));
        assert_eq!(base64_decode("aGVsbG8"), Err(Base64Error::BadLength));
    }
}
