//! Relaying: copy both ways between two channels, socat-style.
//!
//! [`relay`] joins two open streams. Each direction is an independent copy
//! loop; when one side's reading end reaches EOF, the other side's writing
//! end is half-closed (`shutdown(SHUT_WR)`) and the opposite direction goes
//! on until it, too, ends. An error in either direction (a reset, a dead
//! peer) ends both, and closes both streams.
//!
//! When both ends of a direction are sockets, the bytes move with
//! `splice(2)` through a pipe and never enter user space; otherwise (a
//! virtio-serial device, stdio, bytes left over from a hybrid handshake)
//! they are copied through a buffer of [`RelayOptions::buffer_size`].
//!
//! [`serve`] is the listening form: it accepts connections on one address
//! and relays each to a fresh connection to another, at most
//! [`RelayOptions::max_connections`] at a time (further peers wait in the
//! listen backlog), each in its own task, so one slow or broken peer never
//! stalls the others.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::addr::Addr;
use crate::async_io::{AsyncListener, AsyncStream, ReadHalf, WriteHalf};
use crate::sys;

/// How long the relay waits after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// How a relay moves bytes.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Copy-buffer size for the buffered path; also the pipe size for splice.
    pub buffer_size: usize,
    /// Use `splice(2)` where both ends are sockets.
    pub splice: bool,
    /// Connections relayed at once by [`serve`].
    pub max_connections: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            buffer_size: 256 * 1024,
            splice: true,
            max_connections: 1024,
        }
    }
}

/// Bytes moved by one relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// From the first stream to the second.
    pub forward: u64,
    /// From the second stream to the first.
    pub backward: u64,
}

/// Relays between `a` and `b` until both directions have ended.
pub async fn relay(a: AsyncStream, b: AsyncStream, opts: &RelayOptions) -> io::Result<RelayStats> {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let (forward, backward) =
        tokio::try_join!(copy_one_way(ar, bw, opts), copy_one_way(br, aw, opts))?;
    Ok(RelayStats { forward, backward })
}

/// Copies `r` to `w` until EOF, then half-closes `w`. Returns the byte count.
pub async fn copy_one_way(
    mut r: ReadHalf,
    mut w: WriteHalf,
    opts: &RelayOptions,
) -> io::Result<u64> {
    let mut total = 0u64;
    if opts.splice && r.splice_fd().is_some() && w.splice_fd().is_some() {
        match splice_loop(&r, &w, opts.buffer_size, &mut total).await {
            Ok(()) => {
                w.shutdown_write()?;
                return Ok(total);
            }
            // Some descriptors cannot splice; fall back before anything moved.
            Err(e) if total == 0 && e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; opts.buffer_size.max(4096)];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    w.flush().await?;
    w.shutdown_write()?;
    Ok(total)
}

async fn splice_loop(r: &ReadHalf, w: &WriteHalf, size: usize, total: &mut u64) -> io::Result<()> {
    let (pr, pw) = sys::pipe()?;
    let cap = sys::set_pipe_size(pw.as_fd_ref(), size).unwrap_or(64 * 1024);
    let mut past_mark = Vec::new();
    // Only TCP has an urgent mark: other sockets skip the SIOCATMARK call at each wait.
    let tcp = r
        .splice_fd()
        .and_then(|fd| sys::socket_domain(fd).ok())
        .is_some_and(|d| d == libc::AF_INET || d == libc::AF_INET6);
    loop {
        // The pipe is empty here, so EAGAIN can only mean "no data yet" (or the urgent mark).
        let n = r
            .read_with(|fd| match sys::splice(fd, pw.as_fd_ref(), cap) {
                // Splicing out of TCP stops at a peer's urgent byte (`MSG_OOB`): it reads
                // nothing more, and after a FIN it says end of file with data still queued.
                // A plain read steps over the urgent byte, as the buffered path does: read
                // what follows it into the (empty) pipe, then splice on.
                Ok(0) if tcp && sys::at_urgent_mark(fd) => {
                    past_urgent_byte(fd, &pw, cap, &mut past_mark)
                }
                Err(e)
                    if tcp && e.kind() == io::ErrorKind::WouldBlock && sys::at_urgent_mark(fd) =>
                {
                    past_urgent_byte(fd, &pw, cap, &mut past_mark)
                }
                other => other,
            })
            .await?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = w
                .write_with(|fd| sys::splice(pr.as_fd_ref(), fd, left))
                .await?;
            left -= m;
            *total += m as u64;
        }
    }
}

/// Reads past a TCP urgent byte into the empty pipe `pw` (at most `cap` bytes, which it
/// takes whole). `Ok(0)` at end of file; `WouldBlock` when nothing follows the byte yet.
fn past_urgent_byte(
    fd: std::os::fd::BorrowedFd<'_>,
    pw: &std::os::fd::OwnedFd,
    cap: usize,
    buf: &mut Vec<u8>,
) -> io::Result<usize> {
    buf.resize(cap.min(64 * 1024), 0);
    // A plain read on this non-blocking socket; it skips the urgent byte itself.
    let n = sys::read(fd, buf)?;
    if n > 0 {
        let mut done = 0;
        while done < n {
            done += sys::write(pw.as_fd_ref(), &buf[done..n], false)?;
        }
    }
    Ok(n)
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}
impl AsFdRef for std::os::fd::OwnedFd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// Counters of a running [`serve`], readable while it runs.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections relayed to the end without error.
    pub completed: AtomicU64,
    /// Connections that ended with an error (either side).
    pub failed: AtomicU64,
    /// Bytes moved, both directions.
    pub bytes: AtomicU64,
}

/// Accepts on `listener` and relays each connection to a new connection to
/// `target`, until `shutdown` completes. Returns when the listener is
/// closed; connections still running are dropped (closed) then.
pub async fn serve(
    listener: AsyncListener,
    target: Addr,
    opts: RelayOptions,
    stats: Arc<ServeStats>,
    shutdown: impl Future<Output = ()>,
) -> crate::Result<()> {
    let sem = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let opts = Arc::new(opts);
    let target = Arc::new(target);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Wait for a free slot first: beyond the bound, peers wait in the backlog.
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = &mut shutdown => break,
            // Reap finished tasks so the set does not grow without bound.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => { drop(permit); continue; }
        };
        let a = match conn {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: say so and keep serving, after a moment: the listener
                // stays readable, and trying again at once would spin (and log) until a
                // descriptor is free.
                tracing::warn!(error = %e, "accept failed; trying again in 100 ms");
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = &mut shutdown => break,
                }
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (target, opts, stats) = (target.clone(), opts.clone(), stats.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let b = match AsyncStream::connect(&target).await {
                Ok(b) => b,
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %crate::error_chain(&e), "dropping a connection");
                    return;
                }
            };
            match relay(a, b, &opts).await {
                Ok(s) => {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes
                        .fetch_add(s.forward + s.backward, Ordering::Relaxed);
                    tracing::debug!(
                        forward = s.forward,
                        backward = s.backward,
                        "connection done"
                    );
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, "connection ended with an error");
                }
            }
        });
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}
