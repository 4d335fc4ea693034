//! `Logs`: the end of a file, then (with `follow`) what is appended to it, like `tail -F`.
//!
//! The agent sends the last `lines` lines (at most [`MAX_LOG_TAIL_BYTES`] of them) as `Data`
//! frames; without `follow` it then sends `Done` and closes. With `follow` it checks the file
//! every [`FOLLOW_INTERVAL`] and sends what was appended, until the client closes:
//!
//! - **rotation** (the path now names another file: renamed away and recreated): the rest of the
//!   old file is sent, then the new one from its start;
//! - **truncation** (the file is shorter than what was sent): it is sent again from its start;
//! - a path that disappears is waited for (the old file is kept open meanwhile).
//!
//! Without `follow`, the agent sends the file up to the length it had when opened, so a file
//! that grows faster than the client reads still ends. File I/O runs on the blocking pool: a
//! read that hangs (a dead network mount) holds up this request only, never a ping or a kill.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tracing::debug;
use vmlink_proto::agent::{ErrorKind, Logs, Message, MAX_DATA_CHUNK, MAX_LOG_TAIL_BYTES};
use vmlink_transport::WriteHalf;

use crate::framed::write_message;
use crate::server::{Reader, SessionError};

/// How often a followed file is checked for new data, rotation and truncation.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// The offset where the last `lines` lines of `f` (of length `len`) start, looking back at most
/// `max_back` bytes.
fn tail_start(f: &mut File, len: u64, lines: u32, max_back: u64) -> io::Result<u64> {
    if lines == 0 {
        return Ok(len);
    }
    let floor = len.saturating_sub(max_back);
    let mut pos = len;
    let mut newlines = 0u32;
    let mut buf = vec![0u8; 64 * 1024];
    // A final newline ends the last line; it does not start another.
    let mut skip_last = true;
    while pos > floor {
        let n = (pos - floor).min(buf.len() as u64) as usize;
        pos -= n as u64;
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                skip_last = false;
                continue;
            }
            if skip_last {
                skip_last = false;
                continue;
            }
            newlines += 1;
            if newlines == lines {
                return Ok(pos + i as u64 + 1);
            }
        }
    }
    Ok(floor)
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Sends what `f` holds from its position to its end, or at most `limit` bytes of it; returns
/// the file (reads run on the blocking pool) and the bytes sent.
async fn send_rest(
    mut f: File,
    limit: Option<u64>,
    w: &mut WriteHalf,
) -> Result<(File, u64), SessionError> {
    let mut total = 0u64;
    loop {
        let want = limit.map_or(MAX_DATA_CHUNK as u64, |l| {
            (l - total).min(MAX_DATA_CHUNK as u64)
        }) as usize;
        if want == 0 {
            return Ok((f, total));
        }
        let (back, chunk) = blocking(move || {
            let mut buf = vec![0u8; want];
            loop {
                match f.read(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        return Ok((f, buf));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .map_err(|e| SessionError::Wire(e.into()))?;
        f = back;
        if chunk.is_empty() {
            return Ok((f, total));
        }
        total += chunk.len() as u64;
        write_message(w, &Message::Data(chunk)).await?;
    }
}

/// Opens a log file: a regular file only. Opening a device can act (`/dev/watchdog` arms on
/// open; a terminal may become the agent's controlling terminal) and a FIFO or a terminal would
/// block a read, so the path is first opened with `O_PATH` (which opens nothing) and checked,
/// and only that very file is then opened for reading, through `/proc/self/fd` (so a symlink
/// swapped in meanwhile changes nothing), never blocking and never taking a terminal.
fn open_log(path: &str) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |kind: std::fs::FileType| {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file (logs reads regular files; use exec for devices and pipes)"
        };
        io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}"))
    };
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    let meta = handle.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refuse(meta.file_type()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    let opened = f.metadata()?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(io::Error::other("the file changed while it was opened"));
    }
    Ok(f)
}

fn io_error(op: &str, path: &str, e: &io::Error) -> String {
    format!("cannot {op} {path}: {e}")
}

/// Serves one `Logs` request.
pub(crate) async fn serve_logs(
    logs: Logs,
    mut reader: Reader,
    w: &mut WriteHalf,
) -> Result<(), SessionError> {
    let path = logs.path.clone();
    let lines = logs.lines;
    let opened = {
        let path = path.clone();
        blocking(move || {
            let mut f = open_log(&path)?;
            let meta = f.metadata()?;
            let start = tail_start(&mut f, meta.len(), lines, MAX_LOG_TAIL_BYTES)?;
            f.seek(SeekFrom::Start(start))?;
            Ok((f, meta, start))
        })
        .await
    };
    let (file, meta, start) = match opened {
        Ok(x) => x,
        Err(e) => {
            let message = io_error("read", &path, &e);
            write_message(w, &Message::error(ErrorKind::Io, &message)).await?;
            return Err(SessionError::Refused(message));
        }
    };
    // Without follow: up to the length the file had when opened.
    let limit = (!logs.follow).then(|| meta.len() - start);
    let (mut file, _) = send_rest(file, limit, w).await?;
    if !logs.follow {
        write_message(w, &Message::Done).await?;
        let _ = w.shutdown_write();
        return Ok(());
    }
    let mut id = (meta.dev(), meta.ino());
    let mut ticker = tokio::time::interval(FOLLOW_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = reader.next() => match m {
                // The client stops following by closing.
                Ok(None) => return Ok(()),
                Ok(Some(other)) => {
                    let message = format!("{} is not allowed while following a file", other.message_type());
                    write_message(w, &Message::error(ErrorKind::BadRequest, &message)).await?;
                    return Err(SessionError::Refused(message));
                }
                Err(e) => return Err(e.into()),
            },
            _ = ticker.tick() => {
                // Truncated: start again from the beginning.
                let (back, truncated) = blocking(move || {
                    let pos = file.stream_position()?;
                    let truncated = file.metadata().is_ok_and(|m| m.len() < pos);
                    if truncated {
                        file.seek(SeekFrom::Start(0))?;
                    }
                    Ok((file, truncated))
                })
                .await
                .map_err(|e| SessionError::Wire(e.into()))?;
                if truncated {
                    debug!(path, "file truncated; following from its start");
                }
                (file, _) = send_rest(back, None, w).await?;
                // Rotated: the path names another file now. The old one's rest was sent above.
                let rotated = {
                    let path = path.clone();
                    blocking(move || {
                        let moved = std::fs::metadata(&path)
                            .is_ok_and(|m| (m.dev(), m.ino()) != id);
                        if !moved {
                            return Ok(None);
                        }
                        // The identity is the opened file's, so a second rotation between the
                        // check and the open is not taken for this one.
                        Ok(open_log(&path)
                            .and_then(|f| f.metadata().map(|m| (f, (m.dev(), m.ino()))))
                            .ok())
                    })
                    .await
                    .map_err(|e| SessionError::Wire(e.into()))?
                };
                if let Some((new, new_id)) = rotated {
                    // What was written to the old file since the read above (the rotation may
                    // have come in between), then the new one.
                    let _ = send_rest(file, None, w).await?;
                    debug!(path, "file rotated; following the new one");
                    id = new_id;
                    (file, _) = send_rest(new, None, w).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(content: &[u8], lines: u32, max_back: u64) -> u64 {
        let path = std::env::temp_dir().join(format!(
            "vmlink-tail-{}-{lines}-{max_back}-{}",
            std::process::id(),
            content.len()
        ));
        std::fs::write(&path, content).expect("write");
        let mut f = File::open(&path).expect("open");
        let s = tail_start(&mut f, content.len() as u64, lines, max_back).expect("tail");
        let _ = std::fs::remove_file(&path);
        s
    }

    #[test]
    fn tail_starts_where_the_last_n_lines_do() {
        let text = b"one\ntwo\nthree\n";
        assert_eq!(start(text, 1, 1 << 20), 8);
        assert_eq!(start(text, 2, 1 << 20), 4);
        assert_eq!(start(text, 3, 1 << 20), 0);
        assert_eq!(start(text, 10, 1 << 20), 0);
        assert_eq!(start(text, 0, 1 << 20), 14);
        // No final newline: the partial last line counts as a line.
        assert_eq!(start(b"one\ntwo", 1, 1 << 20), 4);
        assert_eq!(start(b"", 5, 1 << 20), 0);
        // Bounded: never further back than max_back.
        assert_eq!(start(text, 3, 5), 9);
    }
}
