//! Frames over an async byte stream: the I/O half of `vmlink_proto::agent`, shared by the
//! agent and the client.

use std::io;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vmlink_proto::agent::{Decoder, FrameError, Message, MessageType, HEADER_LEN};

/// Reading or writing frames failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed.
    #[error("I/O error")]
    Io(#[from] io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("protocol error")]
    Frame(#[from] FrameError),
}

/// How much a reader asks the socket for at once.
const READ_CHUNK: usize = 64 * 1024;

/// Reads whole messages from a byte stream.
///
/// Big raw payloads (`Data`, `Stdout`, ...) are read from the stream straight into the
/// message's own buffer ([`Decoder::take_partial_raw`]): a copy's bytes are copied once, by the
/// kernel, not three times. While such frames follow each other, the reader asks for one
/// header at a time, so that the next payload also lands in its own buffer.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
    buf: Vec<u8>,
    /// A raw frame whose payload is being read: its type, length and what has arrived.
    partial: Option<(MessageType, usize, Vec<u8>)>,
    /// The last frame was a big raw one: read the next header alone.
    bulk: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            decoder: Decoder::new(),
            buf: vec![0; READ_CHUNK],
            partial: None,
            bulk: false,
        }
    }

    /// The stream, dropping what is buffered.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// The next message; `None` when the peer closed between frames.
    ///
    /// Cancel-safe: bytes are handed to the decoder (or the payload being filled) in the same
    /// poll that reads them, so a `select!` that drops this future loses nothing.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, WireError> {
        loop {
            if let Some((ty, len, payload)) = self.partial.as_mut() {
                if payload.len() < *len {
                    let want = *len - payload.len();
                    let n = self
                        .inner
                        .read_buf(&mut (&mut *payload).limit(want))
                        .await?;
                    if n == 0 {
                        return Err(WireError::Frame(FrameError::Truncated {
                            partial_len: HEADER_LEN + payload.len(),
                        }));
                    }
                    continue;
                }
                let (ty, payload) = (*ty, std::mem::take(payload));
                self.partial = None;
                self.bulk = true;
                // `take_partial_raw` hands out raw-bytes types only.
                return Message::from_raw(ty, payload)
                    .map(Some)
                    .ok_or(WireError::Frame(FrameError::UnknownType { ty: ty as u8 }));
            }
            if let Some(m) = self.decoder.next_message()? {
                self.bulk = false;
                return Ok(Some(m));
            }
            if let Some(p) = self.decoder.take_partial_raw()? {
                self.partial = Some(p);
                continue;
            }
            let want = match (self.bulk, self.decoder.buffered()) {
                (true, b) if b < HEADER_LEN => HEADER_LEN - b,
                _ => READ_CHUNK,
            };
            let n = self.inner.read(&mut self.buf[..want]).await?;
            if n == 0 {
                self.decoder.eof()?;
                return Ok(None);
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }
}

/// Writes one message in one `write_all`.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
) -> Result<(), WireError> {
    let frame = message.encode()?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlink_proto::agent::encode_header;

    /// Big payloads go the direct way (in pieces, as a socket delivers them) and come out whole
    /// and in order with the small frames around them; a stream that ends inside a payload is
    /// `Truncated`, naming how much of the frame arrived.
    #[tokio::test]
    async fn big_payloads_read_directly_arrive_whole_and_a_cut_one_is_truncated() {
        let big: Vec<u8> = (0..700_000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = Vec::new();
        for m in [
            Message::Ping,
            Message::Data(big.clone()),
            Message::Stdout(b"small".to_vec()),
            Message::Data(big[..70_000].to_vec()),
            Message::Done,
        ] {
            m.encode_into(&mut stream).expect("encodes");
        }
        let (mut w, r) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            for piece in stream.chunks(1000) {
                w.write_all(piece).await.expect("write");
            }
        });
        let mut reader = FrameReader::new(r);
        let mut got = Vec::new();
        while let Some(m) = reader.next().await.expect("valid stream") {
            got.push(m);
        }
        writer.await.expect("writer");
        assert_eq!(
            got,
            vec![
                Message::Ping,
                Message::Data(big.clone()),
                Message::Stdout(b"small".to_vec()),
                Message::Data(big[..70_000].to_vec()),
                Message::Done,
            ]
        );

        let (mut w, r) = tokio::io::duplex(1 << 20);
        let header = encode_header(MessageType::Data, 100_000).expect("header");
        w.write_all(&header).await.expect("write");
        w.write_all(&big[..10_000]).await.expect("write");
        drop(w);
        let mut reader = FrameReader::new(r);
        match reader.next().await {
            Err(WireError::Frame(FrameError::Truncated { partial_len })) => {
                assert_eq!(partial_len, HEADER_LEN + 10_000);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }
}
