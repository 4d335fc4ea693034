//! One connection on the agent side: policy check, `Hello`, one request.
//!
//! States, in order: `Checking` (vsock peer CID against the policy), `Greeting` (waiting for the
//! client's `Hello`, bounded by `Policy::request_timeout`, [`crate::REQUEST_TIMEOUT`] by
//! default), `Waiting` (for the one request, same bound),
//! then `Serving` that request. Each state is a step of [`serve`]; any failure ends the
//! connection. Events a peer causes are logged at `debug`, never `warn`.

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{debug, info};
use vmlink_proto::agent::{
    encode_header, ErrorKind, Exec, Exit, Hello, Info, Message, MessageType, StdinAck, FEATURES,
    HEADER_LEN, MAX_DATA_CHUNK, PROTOCOL_VERSION, STDIN_WINDOW,
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

/// The command's process group, shared by the exec loop and the task reading the client's
/// frames: armed from spawn until the group leader has been reaped (until then its id cannot
/// name another group). Signals go to the group only while it is armed.
#[derive(Clone)]
struct Group(Arc<std::sync::Mutex<Option<Pid>>>);

impl Group {
    fn new(pgid: Option<Pid>) -> Group {
        Group(Arc::new(std::sync::Mutex::new(pgid)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pid>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `signo` to the group; false when it is gone or the number is no signal.
    fn signal(&self, signo: i32) -> bool {
        match (*self.lock(), NixSignal::try_from(signo)) {
            (Some(pgid), Ok(sig)) => killpg(pgid, sig).is_ok(),
            (None, _) => {
                debug!(signo, "signal after the command exited: ignored");
                false
            }
            (_, Err(_)) => {
                debug!(signo, "invalid signal number: ignored");
                false
            }
        }
    }

    /// Kills the group with `SIGKILL` and disarms.
    fn kill(&self) {
        if let Some(pgid) = self.lock().take() {
            let _ = killpg(pgid, NixSignal::SIGKILL);
        }
    }

    /// The leader was reaped: its id may be reused, so never signal it again. (`child.wait()`
    /// reaps just before this runs; a signal the pump sends in between could only reach
    /// another group if the kernel handed out the same id within those microseconds, which
    /// takes a wrap of the whole pid space.)
    fn reaped(&self) {
        self.lock().take();
    }

    fn pgid(&self) -> i32 {
        self.lock().map_or(0, Pid::as_raw)
    }
}

/// Kills the group when dropped (the exec ended early, or the agent's task was cancelled).
struct GroupKiller(Group);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the incoming half of an exec connection reports to the exec loop, after acting on it.
enum Incoming {
    /// The client closed or broke the connection; the group (`pgid`, 0 if it had exited) was
    /// killed.
    Gone { pgid: i32, error: Option<WireError> },
    /// The client sent a message that has no place here; the group was killed.
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
    let group = Group::new(pid.map(Pid::from_raw));
    let _killer = GroupKiller(group.clone());
    debug!(?pid, argv = ?exec.argv, tty = exec.tty, user = ?exec.user, "exec started");
    let mut stderr = stderr;

    // The client's frames are read by a task of their own, which also acts on signals and on
    // the client going away: a client that stops reading the output (so that writes below
    // wait) can still interrupt or kill the command.
    let (events_tx, mut events) = mpsc::channel(16);
    // A client that keeps to the stdin window learns how much of its input left the queue.
    let acks = exec.stdin_window.then(|| Arc::new(Acks::default()));
    let _pump = AbortOnDrop(tokio::spawn(pump_incoming(
        reader,
        stdin,
        events_tx,
        group.clone(),
        acks.clone(),
    )));
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
            // The pump has already signalled or killed the group; here the exec ends.
            event = events.recv(), if events_open => match event {
                Some(Incoming::Gone { pgid, error }) => {
                    if let Some(e) = error {
                        debug!("exec connection failed: {e}");
                    }
                    return Err(SessionError::Abandoned { pgid });
                }
                Some(Incoming::Unexpected(ty)) => {
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
            () = async {
                match &acks {
                    Some(a) => a.ready.notified().await,
                    None => std::future::pending().await,
                }
            } => {
                let bytes = acks.as_ref().map_or(0, |a| a.bytes.swap(0, Ordering::Relaxed));
                // Woken at ACK_EVERY, so this is at least that much (or 0 for a stale wake-up).
                if bytes > 0 {
                    write_message(w, &Message::StdinAck(StdinAck { bytes })).await?;
                }
            }
            st = child.wait(), if status.is_none() => {
                // Once reaped, the group id may be reused: never signal it again.
                group.reaped();
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

/// How many bytes of `Stdin` frames wait for the command to read them before the agent stops
/// reading the client's frames (4 MiB, one frame more at most): the stdin window
/// ([`STDIN_WINDOW`]). A client that keeps to the window never fills it, so the agent always
/// reads its frames. With a client that does not (an older one, which sends no
/// `stdin_window`), a signal or a disconnect behind more unread input than this waits until the
/// command reads it (or exits, or writes output the client no longer takes).
const STDIN_QUEUE: usize = STDIN_WINDOW as usize;

/// Stdin bytes that left the queue and are not yet acknowledged to the client, and the wake-up
/// of the exec loop that sends the `StdinAck`.
#[derive(Default)]
struct Acks {
    bytes: AtomicU64,
    ready: tokio::sync::Notify,
}

/// A piece of stdin's share of [`STDIN_QUEUE`]: given back, and acknowledged to a windowed
/// client, when the piece leaves the queue, whichever way it leaves (written to the command,
/// dropped after the command closed its stdin, or dropped with the exec).
struct Queued {
    _room: OwnedSemaphorePermit,
    len: u64,
    acks: Option<Arc<Acks>>,
}

/// Input acknowledged in one `StdinAck` at least (a quarter of the window): fewer frames and
/// wake-ups than one per `Stdin` frame. It cannot stall a client: with the window full, either
/// this much waits to be acknowledged, or more than the rest of the window waits in the queue
/// for the command, and what the command reads next completes an ack.
const ACK_EVERY: u64 = STDIN_WINDOW / 4;

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(a) = &self.acks {
            let before = a.bytes.fetch_add(self.len, Ordering::Relaxed);
            if before < ACK_EVERY && before + self.len >= ACK_EVERY {
                a.ready.notify_one();
            }
        }
    }
}

/// What the pump hands the stdin task: data with its share of [`STDIN_QUEUE`], or the EOF.
type StdinItem = Option<(Vec<u8>, Queued)>;

/// Reads the client's frames for the whole exec: stdin goes to the command (through a queue, by
/// a task of its own), signals and window sizes act at once, and a closed connection kills the
/// group. Ends after reporting `Gone` or `Unexpected`.
async fn pump_incoming(
    mut reader: Reader,
    stdin: Option<StdinSink>,
    events: mpsc::Sender<Incoming>,
    group: Group,
    acks: Option<Arc<Acks>>,
) {
    let pty = match &stdin {
        Some(StdinSink::Pty(t)) => Some(t.clone()),
        _ => None,
    };
    let (input_tx, input_rx) = mpsc::unbounded_channel::<StdinItem>();
    let room = Arc::new(tokio::sync::Semaphore::new(STDIN_QUEUE));
    let _writer = stdin.map(|sink| AbortOnDrop(tokio::spawn(feed_stdin(sink, input_rx))));
    let mut input = Some(input_tx);
    loop {
        let event = match reader.next().await {
            Ok(Some(Message::Stdin(data))) => {
                // Room for it in the queue (a frame is at most 1 MiB: it always fits).
                let want = u32::try_from(data.len().min(STDIN_QUEUE)).unwrap_or(u32::MAX);
                let Ok(permit) = room.clone().acquire_many_owned(want).await else {
                    continue; // never closed
                };
                let permit = Queued {
                    _room: permit,
                    len: data.len() as u64,
                    acks: acks.clone(),
                };
                // A closed queue: the command closed its stdin; drop the rest, as a pipe would.
                if let Some(tx) = &input {
                    if tx.send(Some((data, permit))).is_err() {
                        input = None;
                    }
                }
                continue;
            }
            Ok(Some(Message::StdinEof)) => {
                // A pipe is closed after what is queued; a terminal gets Ctrl-D, and stays
                // open for what may still come (as typed after a Ctrl-D).
                match (&pty, &input) {
                    (Some(_), Some(tx)) => {
                        let _ = tx.send(None);
                    }
                    _ => {
                        if let Some(tx) = input.take() {
                            let _ = tx.send(None);
                        }
                    }
                }
                continue;
            }
            Ok(Some(Message::Resize(size))) => {
                if let Some(t) = &pty {
                    if let Err(e) = t.resize(size) {
                        debug!("resizing the terminal: {e}");
                    }
                }
                continue;
            }
            Ok(Some(Message::Signal(s))) => {
                group.signal(s.signo);
                continue;
            }
            Ok(Some(other)) => {
                group.kill();
                Incoming::Unexpected(other.message_type())
            }
            Ok(None) => Incoming::Gone {
                pgid: group.pgid(),
                error: None,
            },
            Err(e) => Incoming::Gone {
                pgid: group.pgid(),
                error: Some(e),
            },
        };
        if matches!(event, Incoming::Gone { .. }) {
            group.kill();
        }
        let _ = events.send(event).await;
        return;
    }
}

/// Writes what the client sends to the command's stdin, in order (each piece's share of the
/// queue is given back once written); `None` is the client's EOF: a pipe is closed, a terminal
/// gets its EOF character (Ctrl-D), as typed.
async fn feed_stdin(mut sink: StdinSink, mut input: mpsc::UnboundedReceiver<StdinItem>) {
    while let Some(item) = input.recv().await {
        let written = match (&mut sink, item) {
            (StdinSink::Pipe(p), Some((data, _room))) => p.write_all(&data).await,
            (StdinSink::Pty(t), Some((data, _room))) => t.write_all(&data).await,
            (StdinSink::Pty(t), None) => t.write_all(&[4]).await,
            (StdinSink::Pipe(_), None) => return,
        };
        if let Err(e) = written {
            // The process closed its stdin: the rest is dropped (the queue closes).
            debug!("writing the command's stdin: {e}");
            return;
        }
    }
}
