//! One connection on the agent side: policy check, `Hello`, one request.
//!
//! States, in order: `Checking` (vsock peer CID against the policy), `Greeting` (waiting for the
//! client's `Hello`, bounded by `Policy::request_timeout`, [`crate::REQUEST_TIMEOUT`] by
//! default), `Waiting` (for the one request, same bound),
//! then `Serving` that request. Each state is a step of [`serve`]; any failure ends the
//! connection. Events a peer causes are logged at `debug`, never `warn`.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{debug, info};
use vmlink_proto::agent::{
    encode_header, ErrorKind, Exec, Exit, Hello, Info, Message, MessageType, FEATURES, HEADER_LEN,
    MAX_DATA_CHUNK, PROTOCOL_VERSION,
};
use vmlink_transport::{Addr, AsyncStream, ReadHalf, WriteHalf};

use crate::exec::{Script, SpawnError, Spawned, StdinSink};
use crate::framed::{write_message, FrameReader, WireError};
use crate::Shared;

/// How long a `Run`'s script may take to arrive (at most 16 MiB).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection ended early. Logged, never sent (the peer gets an `Error` frame instead).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// Reading or writing frames failed (the client went away, or sent garbage).
    #[error("connection failed")]
    Wire(#[from] WireError),
    /// The client sent nothing in time.
    #[error("no {waiting_for} within {after:?}")]
    Timeout {
        /// What was expected.
        waiting_for: &'static str,
        /// How long it was awaited.
        after: Duration,
    },
    /// The client closed before its request.
    #[error("the client closed before sending {waiting_for}")]
    Closed {
        /// What was expected.
        waiting_for: &'static str,
    },
    /// The client broke the protocol; it was told why.
    #[error("refused: {0}")]
    Refused(String),
    /// The client went away while its command ran; the process group was killed.
    #[error("the client went away while its command ran; killed process group {pgid}")]
    Abandoned {
        /// The killed group.
        pgid: i32,
    },
}

pub(crate) type Reader = FrameReader<ReadHalf>;

/// Serves one accepted connection.
pub(crate) async fn serve(
    stream: AsyncStream,
    listener: Addr,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let label = stream.label().to_string();
    let (r, mut w) = stream.into_split();
    let result = match permit {
        None => {
            let max = shared.policy.max_sessions;
            refuse(
                r,
                &mut w,
                ErrorKind::Busy,
                format!("the agent is serving its limit of {max} sessions; try again"),
            )
            .await
        }
        Some(_permit) => session(r, &mut w, &listener, &shared).await,
    };
    match result {
        Ok(()) => debug!("{label}: connection done"),
        Err(e) => info!(
            "{label}: {}",
            vmlink_transport::error_chain(&e as &(dyn std::error::Error + 'static))
        ),
    }
}

async fn session(
    r: ReadHalf,
    w: &mut WriteHalf,
    listener: &Addr,
    shared: &Shared,
) -> Result<(), SessionError> {
    // Checking: before reading a byte from a vsock peer.
    if listener.is_vsock() {
        let allowed = &shared.policy.allow_cids;
        match peer_cid(&r) {
            Some(cid) if allowed.allows(cid) => {}
            Some(cid) => {
                let message = format!(
                    "vsock CID {cid} is not allowed to use this agent (allowed: {allowed}); \
                     start the agent with --allow-cid {cid} to allow it"
                );
                return refuse(r, w, ErrorKind::Refused, message).await;
            }
            None => {
                let message = "cannot tell the vsock peer's CID, so it is not allowed".to_string();
                return refuse(r, w, ErrorKind::Refused, message).await;
            }
        }
    }
    let mut reader = FrameReader::new(r);

    // Greeting.
    let limit = shared.policy.request_timeout;
    let hello = match next(&mut reader, "Hello", limit).await? {
        Message::Hello(h) => h,
        other => {
            return protocol_error(w, format!("expected Hello, got {}", other.message_type())).await
        }
    };
    if hello.version < 1 {
        let message = format!(
            "client speaks agent protocol version {}, this agent speaks {PROTOCOL_VERSION}",
            hello.version
        );
        write_message(w, &Message::error(ErrorKind::UnsupportedVersion, &message)).await?;
        return Err(SessionError::Refused(message));
    }
    let ours = Hello {
        version: PROTOCOL_VERSION,
        software: concat!("vmlink-agent/", env!("CARGO_PKG_VERSION")).to_string(),
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
    };
    write_message(w, &Message::Hello(ours)).await?;

    // Waiting (bounded like the greeting: an idle client must not hold a session slot), then
    // Serving.
    let request = match tokio::time::timeout(limit, reader.next()).await {
        Err(_) => {
            return Err(SessionError::Timeout {
                waiting_for: "a request",
                after: limit,
            })
        }
        Ok(Ok(Some(m))) => m,
        // A client that only wanted the Hello (e.g. `Client::connect`).
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e.into()),
    };
    match request {
        Message::Ping => write_message(w, &Message::Pong).await?,
        Message::InfoRequest => write_message(w, &Message::Info(info(shared).await)).await?,
        Message::Exec(exec) => return run_exec(exec, None, reader, w, shared).await,
        Message::Run(run) => {
            if let Err(message) = shared.policy.exec.check_run(&run.exec.argv[0]) {
                write_message(w, &Message::error(ErrorKind::Refused, &message)).await?;
                return Err(SessionError::Refused(message));
            }
            let script = match receive_script(&mut reader, w, run.size).await? {
                Ok(s) => s,
                Err(()) => return Ok(()),
            };
            return run_exec(run.exec, Some(script), reader, w, shared).await;
        }
        Message::Put(put) => {
            if let Err(message) = shared.policy.exec.check_put(&put.path) {
                let r = reader.into_inner();
                return refuse(r, w, ErrorKind::Refused, message).await;
            }
            return crate::files::serve_put(put, reader, w).await;
        }
        Message::Get(get) => return crate::files::serve_get(get, reader, w).await,
        Message::Logs(logs) => return crate::logs::serve_logs(logs, reader, w).await,
        other => {
            return protocol_error(
                w,
                format!(
                    "expected a request (Ping, InfoRequest, Exec, Run, Put, Get, Logs), got {}",
                    other.message_type()
                ),
            )
            .await
        }
    }
    let _ = w.shutdown_write();
    Ok(())
}

/// The next message within `limit`.
async fn next(
    reader: &mut Reader,
    waiting_for: &'static str,
    limit: Duration,
) -> Result<Message, SessionError> {
    match tokio::time::timeout(limit, reader.next()).await {
        Err(_) => Err(SessionError::Timeout {
            waiting_for,
            after: limit,
        }),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(SessionError::Closed { waiting_for }),
        Ok(Err(e)) => Err(e.into()),
    }
}

async fn protocol_error(w: &mut WriteHalf, message: String) -> Result<(), SessionError> {
    write_message(w, &Message::error(ErrorKind::BadRequest, &message)).await?;
    Err(SessionError::Refused(message))
}

/// Sends one `Error` frame, half-closes, and reads (and drops) what the peer sends for a moment,
/// so that closing with unread bytes does not reset the connection before the peer has read
/// the error.
async fn refuse(
    mut r: ReadHalf,
    w: &mut WriteHalf,
    kind: ErrorKind,
    message: String,
) -> Result<(), SessionError> {
    write_message(w, &Message::error(kind, &message)).await?;
    let _ = w.shutdown_write();
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        // Bounded in bytes (64 KiB) and, below, in time.
        while total < 64 * 1024 {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    Err(SessionError::Refused(message))
}

/// The CID of a vsock peer (stream or seqpacket).
fn peer_cid(r: &ReadHalf) -> Option<u32> {
    r.vsock_peer().ok().map(|(cid, _)| cid)
}

async fn info(shared: &Shared) -> Info {
    let read = |path: &'static str| async move {
        tokio::fs::read_to_string(path)
            .await
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let os = read("/etc/os-release")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".to_string());
    let uptime_secs = read("/proc/uptime")
        .await
        .split('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Info {
        hostname: read("/proc/sys/kernel/hostname").await,
        os,
        kernel: read("/proc/sys/kernel/osrelease").await,
        uptime_secs,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        channels: shared.channels.clone(),
    }
}

/// Kills a process group with `SIGKILL` when dropped, unless disarmed. Armed from spawn until the
/// group leader has been reaped (until then its id cannot name another group).
struct GroupKiller {
    pgid: Option<Pid>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, NixSignal::SIGKILL);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the incoming half of an exec connection reports to the main loop.
enum Incoming {
    Signal(i32),
    /// The client closed or broke the connection.
    Gone(Option<WireError>),
    /// The client sent a message that has no place here.
    Unexpected(MessageType),
}

pub(crate) async fn run_exec(
    exec: Exec,
    script: Option<Script>,
    reader: Reader,
    w: &mut WriteHalf,
    shared: &Shared,
) -> Result<(), SessionError> {
    let spawned = match crate::exec::spawn(&exec, script.as_ref(), &shared.policy.exec) {
        Ok(s) => s,
        Err(SpawnError::Refused(message)) => {
            write_message(w, &Message::error(ErrorKind::Refused, &message)).await?;
            return Err(SessionError::Refused(message));
        }
        Err(SpawnError::Failed(message)) => {
            write_message(w, &Message::error(ErrorKind::SpawnFailed, &message)).await?;
            return Err(SessionError::Refused(message));
        }
        Err(SpawnError::NotFound(message)) => {
            write_message(w, &Message::error(ErrorKind::NotFound, &message)).await?;
            return Err(SessionError::Refused(message));
        }
    };
    // The memfd is open in the child now; the agent's copy can go.
    drop(script);
    let Spawned {
        mut child,
        mut stdout,
        stderr,
        stdin,
    } = spawned;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let mut killer = GroupKiller {
        pgid: pid.map(Pid::from_raw),
    };
    debug!(?pid, argv = ?exec.argv, tty = exec.tty, user = ?exec.user, "exec started");
    let mut stderr = stderr;

    let (events_tx, mut events) = mpsc::channel(16);
    let incoming = pump_incoming(reader, stdin, events_tx);
    tokio::pin!(incoming);
    let mut incoming_done = false;
    let mut events_open = true;

    let mut out_buf = vec![0u8; HEADER_LEN + MAX_DATA_CHUNK];
    let mut err_buf = vec![0u8; HEADER_LEN + MAX_DATA_CHUNK];
    let (mut out_eof, mut err_eof) = (false, stderr.is_none());
    let mut status = None;
    loop {
        if out_eof && err_eof && status.is_some() {
            break;
        }
        tokio::select! {
            () = &mut incoming, if !incoming_done => incoming_done = true,
            event = events.recv(), if events_open => match event {
                Some(Incoming::Signal(signo)) => {
                    match (killer.pgid, NixSignal::try_from(signo)) {
                        (Some(pgid), Ok(sig)) => {
                            let _ = killpg(pgid, sig);
                        }
                        (None, _) => debug!(signo, "signal after the command exited: ignored"),
                        (_, Err(_)) => debug!(signo, "invalid signal number: ignored"),
                    }
                }
                Some(Incoming::Gone(error)) => {
                    let pgid = killer.pgid.map_or(0, Pid::as_raw);
                    killer.kill();
                    if let Some(e) = error {
                        debug!("exec connection failed: {e}");
                    }
                    return Err(SessionError::Abandoned { pgid });
                }
                Some(Incoming::Unexpected(ty)) => {
                    killer.kill();
                    return protocol_error(w, format!("{ty} is not allowed during an exec")).await;
                }
                None => events_open = false,
            },
            n = stdout.read(&mut out_buf[HEADER_LEN..]), if !out_eof => {
                out_eof = send_chunk(w, MessageType::Stdout, &mut out_buf, n).await?;
            }
            n = async {
                match &mut stderr {
                    Some(e) => e.read(&mut err_buf[HEADER_LEN..]).await,
                    None => Ok(0),
                }
            }, if !err_eof => {
                err_eof = send_chunk(w, MessageType::Stderr, &mut err_buf, n).await?;
            }
            st = child.wait(), if status.is_none() => {
                // Once reaped, the group id may be reused: never signal it again.
                killer.pgid = None;
                status = Some(st.map_err(WireError::Io)?);
            }
        }
    }
    let Some(status) = status else {
        return Ok(());
    };
    let exit = Exit {
        code: status.code(),
        signal: status.signal(),
    };
    debug!(?pid, %exit, "exec finished");
    write_message(w, &Message::Exit(exit)).await?;
    let _ = w.shutdown_write();
    Ok(())
}

/// Receives a `Run`'s script: exactly `size` bytes in `Data` frames, within [`SCRIPT_TIMEOUT`].
async fn receive_script(
    reader: &mut Reader,
    w: &mut WriteHalf,
    size: u64,
) -> Result<Result<Script, ()>, SessionError> {
    let mut script = Vec::new();
    let receive = async {
        while (script.len() as u64) < size {
            match reader.next().await? {
                Some(Message::Data(d)) if script.len() as u64 + d.len() as u64 <= size => {
                    script.extend_from_slice(&d)
                }
                Some(Message::Data(_)) => return Ok(Err("more script data than announced".into())),
                Some(other) => {
                    return Ok(Err(format!(
                        "expected the script's Data, got {}",
                        other.message_type()
                    )))
                }
                None => {
                    return Err(SessionError::Closed {
                        waiting_for: "the script",
                    })
                }
            }
        }
        Ok(Ok(()))
    };
    match tokio::time::timeout(SCRIPT_TIMEOUT, receive).await {
        Err(_) => Err(SessionError::Timeout {
            waiting_for: "the script",
            after: SCRIPT_TIMEOUT,
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Err(message))) => protocol_error(w, message).await.map(|()| Err(())),
        Ok(Ok(Ok(()))) => match Script::new(&script) {
            Ok(s) => Ok(Ok(s)),
            Err(e) => {
                let message = format!("cannot hold the script in a memfd: {e}");
                write_message(w, &Message::error(ErrorKind::SpawnFailed, &message)).await?;
                Err(SessionError::Refused(message))
            }
        },
    }
}

/// Sends the `n` bytes read into `buf[HEADER_LEN..]` as one data frame, without copying them.
/// Returns whether the pipe is at EOF.
async fn send_chunk(
    w: &mut WriteHalf,
    ty: MessageType,
    buf: &mut [u8],
    n: std::io::Result<usize>,
) -> Result<bool, SessionError> {
    let n = match n {
        Ok(0) => return Ok(true),
        Ok(n) => n,
        Err(e) => {
            // A pipe read error: treat as EOF on that stream, after saying so in the log.
            debug!("reading the command's {ty}: {e}");
            return Ok(true);
        }
    };
    let header = encode_header(ty, n).map_err(WireError::Frame)?;
    buf[..HEADER_LEN].copy_from_slice(&header);
    w.write_all(&buf[..HEADER_LEN + n])
        .await
        .map_err(WireError::Io)?;
    Ok(false)
}

/// Reads the client's frames during an exec: stdin data to the process (or its terminal),
/// window sizes to the terminal, signals and the end of the connection to the main loop.
async fn pump_incoming(
    mut reader: Reader,
    mut stdin: Option<StdinSink>,
    events: mpsc::Sender<Incoming>,
) {
    loop {
        let event = match reader.next().await {
            Ok(Some(Message::Stdin(data))) => {
                let written = match &mut stdin {
                    Some(StdinSink::Pipe(p)) => p.write_all(&data).await,
                    Some(StdinSink::Pty(t)) => t.write_all(&data).await,
                    None => Ok(()),
                };
                if let Err(e) = written {
                    // The process closed its stdin: drop the rest, as a pipe would.
                    debug!("writing the command's stdin: {e}");
                    stdin = None;
                }
                continue;
            }
            Ok(Some(Message::StdinEof)) => {
                // A pipe is closed; a terminal gets its EOF character (Ctrl-D), as typed.
                if let Some(StdinSink::Pty(t)) = &mut stdin {
                    let _ = t.write_all(&[4]).await;
                } else {
                    stdin = None;
                }
                continue;
            }
            Ok(Some(Message::Resize(size))) => {
                if let Some(StdinSink::Pty(t)) = &stdin {
                    if let Err(e) = t.resize(size) {
                        debug!("resizing the terminal: {e}");
                    }
                }
                continue;
            }
            Ok(Some(Message::Signal(s))) => Incoming::Signal(s.signo),
            Ok(Some(other)) => Incoming::Unexpected(other.message_type()),
            Ok(None) => Incoming::Gone(None),
            Err(e) => Incoming::Gone(Some(e)),
        };
        let last = !matches!(event, Incoming::Signal(_));
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}
