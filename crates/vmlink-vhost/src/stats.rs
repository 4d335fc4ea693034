//! The stats socket (`--stats-socket PATH`): every VM's counters for scripts, read while the
//! backend runs.
//!
//! Each connection to the Unix stream socket gets one JSON document, one line ending in `\n`,
//! and then end-of-file; nothing needs to be sent (`socat - UNIX-CONNECT:PATH`, `nc -U PATH`,
//! or `vmlink-vhost --print-stats PATH`):
//!
//! ```json
//! {"vms":[{"guest_cid":3,"open_connections":2,"max_connections":1024,
//!   "counters":{"tx_packets":12,"tx_bytes":0,...}}],"capture":null}
//! ```
//!
//! - `vms`: one object per VM, in the order they were given; `counters` has every counter of
//!   [`Counter::ALL`](crate::counters::Counter::ALL) by name, zeros included;
//!   `open_connections` is `connections_opened - connections_closed` (no lock is taken: the
//!   counters are read one by one, relaxed).
//! - `capture`: `null` without `--pcap`, else whether packet capture is on (`SIGUSR2`).
//!
//! One thread serves the socket, one client at a time. A client cannot hold it: the reply is
//! written with a deadline of [`WRITE_TIMEOUT`] in all (a client that does not read is dropped
//! then), and the server never waits to read from a client (see [`serve`] for what it does
//! with bytes a client sends).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::capture::Capture;
use crate::counters::{should_log, Counter, Counters, Snapshot};

/// The time one client gets to take its whole reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// One VM as the stats socket shows it.
#[derive(Debug, Clone)]
pub struct VmStats {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The VM's connection bound.
    pub max_connections: usize,
    /// The VM's counters.
    pub counters: Arc<Counters>,
}

#[derive(Serialize)]
struct Doc {
    vms: Vec<VmDoc>,
    capture: Option<bool>,
}

#[derive(Serialize)]
struct VmDoc {
    guest_cid: u64,
    open_connections: u64,
    max_connections: usize,
    counters: Snapshot,
}

/// The document for `vms` now: one line of JSON ending in `\n`.
pub fn render(vms: &[VmStats], capture: Option<&Capture>) -> String {
    let doc = Doc {
        vms: vms
            .iter()
            .map(|vm| {
                let counters = vm.counters.snapshot();
                VmDoc {
                    guest_cid: vm.guest_cid,
                    open_connections: counters
                        .get(Counter::connections_opened)
                        .saturating_sub(counters.get(Counter::connections_closed)),
                    max_connections: vm.max_connections,
                    counters,
                }
            })
            .collect(),
        capture: capture.map(Capture::enabled),
    };
    // Only numbers, booleans and fixed names: serializing cannot fail.
    let mut s = serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Binds the stats socket at `path`, replacing a socket file left there (the caller checks
/// first that no process listens on it). A file that is not a socket is left alone: binding
/// fails.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path)
}

/// Served clients kept open at most this long, so that a client still sending (`echo | nc -U`)
/// is not reset; then closed.
pub const LINGER: Duration = Duration::from_secs(1);
/// Served clients kept open at most at once; the oldest is closed first.
pub const MAX_LINGERING: usize = 64;

/// Serves `listener` forever: each client gets `doc()` and end-of-file.
///
/// Closing a Unix socket with unread bytes makes the peer's next read fail with ECONNRESET (after
/// the data), and a peer that writes after the close gets EPIPE: `echo | nc -U PATH` or `socat -
/// UNIX-CONNECT:PATH` would fail or lose the document. So a served client is only shut down for
/// writing; its socket stays open for [`LINGER`] (at most [`MAX_LINGERING`] of them), and what
/// it sent is discarded without waiting before it is closed. Nothing a client does makes the
/// server wait for it.
pub fn serve(listener: &UnixListener, doc: impl Fn() -> String) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut lingering: VecDeque<(Instant, UnixStream)> = VecDeque::new();
    let mut errors = 0u64;
    loop {
        while lingering
            .front()
            .is_some_and(|(t, _)| t.elapsed() >= LINGER || lingering.len() > MAX_LINGERING)
        {
            if let Some((_, c)) = lingering.pop_front() {
                close_quietly(c);
            }
        }
        if let Some((t, _)) = lingering.front() {
            // Wait for a client, or for the oldest lingering one's time.
            let left = LINGER.saturating_sub(t.elapsed()).as_millis();
            let timeout = PollTimeout::from(u16::try_from(left + 1).unwrap_or(u16::MAX));
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("stats socket: poll: {e}; not serving stats any more");
                    return;
                }
            }
        }
        let result = listener.accept().and_then(|(mut c, _)| {
            let sent = reply(&mut c, doc().as_bytes());
            let _ = c.shutdown(std::net::Shutdown::Write);
            lingering.push_back((Instant::now(), c));
            sent
        });
        if let Err(e) = result {
            errors += 1;
            if should_log(errors) {
                info!("stats socket: a client was not served: {e} ({errors} so far)");
            }
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
            ) {
                // accept failing (out of fds): do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Writes `doc` to `client` within [`WRITE_TIMEOUT`] in all.
fn reply(client: &mut UnixStream, doc: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut left = doc;
    while !left.is_empty() {
        let time = deadline.saturating_duration_since(Instant::now());
        if time.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client did not take its reply within {WRITE_TIMEOUT:?}"),
            ));
        }
        client.set_write_timeout(Some(time))?;
        match client.write(left) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => left = &left[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Discards what `client` sent, without waiting for more, and closes it.
fn close_quietly(client: UnixStream) {
    if client.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        let mut client = &client;
        for _ in 0..16 {
            match client.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// Reads the document from the stats socket at `path` (the `--print-stats` client), waiting at
/// most `timeout` for it.
pub fn fetch(path: &Path, timeout: Duration) -> io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut doc = Vec::new();
    s.read_to_end(&mut doc)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str) -> (std::path::PathBuf, UnixListener) {
        let dir = std::env::temp_dir().join(format!("vmlink-stats-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("stats.sock");
        let l = bind(&path).expect("bind");
        (path, l)
    }

    #[test]
    fn the_document_has_every_counter_and_the_open_connections() {
        let c = Arc::new(Counters::default());
        c.add(Counter::connections_opened, 5);
        c.add(Counter::connections_closed, 3);
        c.add(Counter::tx_bytes, 7);
        let vms = [VmStats {
            guest_cid: 3,
            max_connections: 64,
            counters: c,
        }];
        let text = render(&vms, None);
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["capture"], serde_json::Value::Null);
        let vm = &v["vms"][0];
        assert_eq!(vm["guest_cid"], 3);
        assert_eq!(vm["open_connections"], 2);
        assert_eq!(vm["max_connections"], 64);
        let counters = vm["counters"].as_object().expect("object");
        let names: Vec<&str> = counters.keys().map(String::as_str).collect();
        let all: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), all.len());
        for n in all {
            assert!(counters.contains_key(n), "{n} in {text}");
        }
        assert_eq!(vm["counters"]["tx_bytes"], 7);
        assert_eq!(vm["counters"]["refused"], 0);
    }

    /// A reply larger than any socket buffer, to a client that never reads: the next client is
    /// served once the first one's deadline has passed.
    #[test]
    fn a_client_that_does_not_read_holds_the_server_at_most_the_timeout() {
        let (path, l) = listener("slow");
        let big = "x".repeat(16 << 20);
        let doc = big.clone();
        std::thread::spawn(move || serve(&l, move || doc.clone()));
        let _stuck = UnixStream::connect(&path).expect("first client");
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let got = fetch(&path, Duration::from_secs(10)).expect("second client served");
        let took = t.elapsed();
        assert_eq!(got.len(), big.len());
        assert!(took < WRITE_TIMEOUT + Duration::from_secs(5), "{took:?}");
        assert!(
            took >= WRITE_TIMEOUT / 2,
            "the first client held it: {took:?}"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// `echo | nc -U PATH`: the client's line may arrive before or after it was served; either
    /// way it reads the document and end-of-file, no reset, and its write does not fail.
    #[test]
    fn bytes_the_client_sent_do_not_reset_it() {
        let (path, l) = listener("sent");
        // Connected and sent before the server accepts: the bytes are there when it replies.
        let mut early = Vec::new();
        for _ in 0..3 {
            let mut s = UnixStream::connect(&path).expect("connect");
            s.write_all(b"\n").expect("send a line before being served");
            early.push(s);
        }
        std::thread::spawn(move || serve(&l, || "{}\n".to_owned()));
        for mut s in early {
            let mut got = String::new();
            s.read_to_string(&mut got)
                .expect("the document then EOF, no reset");
            assert_eq!(got, "{}\n");
        }
        // Sent after being served (the document already read): the socket is still open.
        for _ in 0..3 {
            let mut s = UnixStream::connect(&path).expect("connect");
            let mut got = [0u8; 3];
            s.read_exact(&mut got).expect("the document");
            s.write_all(b"\n")
                .expect("send a line after being served: no EPIPE");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("EOF, no reset");
            assert!(rest.is_empty());
        }
        // Served clients that stay open past the bound of lingering ones: still served.
        let held: Vec<UnixStream> = (0..MAX_LINGERING + 10)
            .map(|_| {
                let mut s = UnixStream::connect(&path).expect("connect");
                let mut got = [0u8; 3];
                s.read_exact(&mut got).expect("the document");
                s
            })
            .collect();
        assert_eq!(
            fetch(&path, Duration::from_secs(5)).expect("served"),
            b"{}\n"
        );
        drop(held);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
