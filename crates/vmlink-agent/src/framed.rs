//! Frames over an async byte stream: the I/O half of `vmlink_proto::agent`, shared by the
//! agent and the client.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vmlink_proto::agent::{Decoder, FrameError, Message};

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
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            decoder: Decoder::new(),
            buf: vec![0; READ_CHUNK],
        }
    }

    /// The stream, dropping what is buffered.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// The next message; `None` when the peer closed between frames.
    ///
    /// Cancel-safe: bytes are handed to the decoder in the same poll that reads them, so a
    /// `select!` that drops this future loses nothing.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, WireError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            let n = self.inner.read(&mut self.buf).await?;
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
