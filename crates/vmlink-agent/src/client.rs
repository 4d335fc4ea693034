//! The host side of the agent protocol.
//!
//! A [`Client`] is an address and the agent's `Hello`; it holds no connection. Each request opens
//! its own connection (`Hello`, request, answer, close), so requests never queue behind one
//! another: a ping on one task is answered while an exec on another streams a gigabyte.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vmlink_agent::client::ClientError> {
//! use vmlink_agent::client::Client;
//! use vmlink_agent::ExecRequest;
//!
//! let client = Client::connect(&"vsock:3:7878".parse().expect("address")).await?;
//! println!("round trip {:?}", client.ping().await?);
//! let req = ExecRequest { argv: vec!["uname".into(), "-a".into()], ..Default::default() };
//! let status = client
//!     .exec(req, None::<tokio::io::Empty>, tokio::io::stdout(), tokio::io::stderr())
//!     .await?;
//! std::process::exit(status.shell_status());
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use vmlink_proto::agent::{
    Checksum, ErrorKind, Exec, Exit, Get, Hello, Info, Logs, Message, MessageType, Put, Run,
    Signal, WindowSize, MAX_DATA_CHUNK, PROTOCOL_VERSION, STDIN_WINDOW,
};
use vmlink_proto::text::printable;
use vmlink_transport::{Addr, AsyncStream, ReadHalf, WriteHalf};

use crate::files::{self, CopySummary, FilesError, Receiver, WriteDebug};
use crate::framed::{write_message, FrameReader, WireError};

/// What [`Client::put`] sends.
#[derive(Debug)]
pub enum PutSource {
    /// A file, directory or symlink (not followed), sent under its own name.
    Path(PathBuf),
    /// What a path names through any symlinks at the path itself (`cp -L`), sent under the
    /// path's own name; symlinks below it are sent as symlinks.
    Followed(PathBuf),
    /// One file's data, read to EOF (e.g. stdin); created as exactly the destination path.
    Reader(Box<dyn ReadDebug>),
}

/// Where [`Client::get`] writes.
#[derive(Debug)]
pub enum GetDest {
    /// A local path: into it when it is a directory, else as it.
    Path(PathBuf),
    /// One file's data (e.g. stdout); the source must be a regular file.
    Writer(Box<dyn WriteDebug>),
}

/// A `Read` that can sit in a `Debug` enum.
pub trait ReadDebug: std::io::Read + Send {}
impl<R: std::io::Read + Send> ReadDebug for R {}
impl std::fmt::Debug for dyn ReadDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Read")
    }
}

/// What produces a `Put`'s frames, on a blocking thread.
type Producer = Box<dyn FnOnce(&files::FrameSink) -> Result<CopySummary, FilesError> + Send>;

/// How long the client waits for the agent's `Error` after a failed write, and (with
/// [`commit_timeout`]) for the agent's final `Done` after the last frame of a `Put`.
pub const COPY_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest disk a `Put`'s commit is allowed for: see [`commit_timeout`].
pub const COMMIT_BYTES_PER_SEC: u64 = 10 << 20;

/// How long the client waits for the agent's final `Done` once it has sent a `Put` of `bytes`:
/// [`COPY_REPLY_TIMEOUT`] plus one second per [`COMMIT_BYTES_PER_SEC`] bytes. The agent may
/// still be writing what is queued and then `fsync`s the last file, whose dirty pages can be a
/// large part of it on a slow (or emulated) disk; a silent agent is still given up on.
pub fn commit_timeout(bytes: u64) -> Duration {
    COPY_REPLY_TIMEOUT + Duration::from_secs(bytes / COMMIT_BYTES_PER_SEC)
}

/// How long the client waits for the agent's `Hello`, and for the answer to a ping or info.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the agent failed.
///
/// The agent's text (its messages, its software's name) is shown with its control characters
/// escaped ([`printable`]): a compromised guest cannot send escape sequences to the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The channel could not be opened.
    #[error("cannot reach the agent")]
    Connect {
        /// The agent's address.
        addr: String,
        /// Why.
        #[source]
        source: vmlink_transport::Error,
    },
    /// The agent does not accept this peer (e.g. its vsock CID is not allowed).
    #[error("the agent at {addr} refused: {}", printable(.message))]
    Refused {
        /// The agent's address.
        addr: String,
        /// The agent's explanation.
        message: String,
    },
    /// The agent could not do what was asked.
    #[error("the agent at {addr} reported {kind}: {}", printable(.message))]
    Agent {
        /// The agent's address.
        addr: String,
        /// The category.
        kind: ErrorKind,
        /// The agent's explanation.
        message: String,
    },
    /// The agent sent a message that has no place here.
    #[error("the agent at {addr} sent {got} where {expected} was expected")]
    Unexpected {
        /// The agent's address.
        addr: String,
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: MessageType,
    },
    /// The agent speaks an older protocol.
    #[error("the agent at {addr} speaks protocol version {version}; this client needs {PROTOCOL_VERSION}")]
    Version {
        /// The agent's address.
        addr: String,
        /// The agent's version.
        version: u32,
    },
    /// The agent is too old for what was asked.
    #[error("the agent at {addr} ({}) does not support {what}; update vmlink-agent in the guest", printable(.software))]
    Unsupported {
        /// The agent's address.
        addr: String,
        /// What it does not support.
        what: &'static str,
        /// The agent's software, from its `Hello`.
        software: String,
    },
    /// The agent closed the connection before answering.
    #[error("the agent at {addr} closed the connection before {waiting_for}")]
    Closed {
        /// The agent's address.
        addr: String,
        /// What was expected.
        waiting_for: &'static str,
    },
    /// The agent did not answer in time.
    #[error("the agent at {addr} sent no {waiting_for} within {within:?}")]
    Timeout {
        /// The agent's address.
        addr: String,
        /// What was expected.
        waiting_for: &'static str,
        /// How long the client waited ([`REPLY_TIMEOUT`] or [`COPY_REPLY_TIMEOUT`]).
        within: Duration,
    },
    /// The connection failed.
    #[error("the connection to the agent at {addr} failed")]
    Wire {
        /// The agent's address.
        addr: String,
        /// Why.
        #[source]
        source: WireError,
    },
    /// A copy failed on this side (local files, checksum, sequence).
    #[error("copying with the agent at {addr} failed")]
    Copy {
        /// The agent's address.
        addr: String,
        /// Why.
        #[source]
        source: FilesError,
    },
    /// Reading the local stdin or writing the local stdout/stderr failed.
    #[error("local {what} failed")]
    Local {
        /// Which stream.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a [`SignalSender`] carries to a running exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Signal(i32),
    Resize(WindowSize),
}

/// Sends signals (and, with a tty, window sizes) to a running exec; see
/// [`Client::exec_with_signals`].
#[derive(Debug, Clone)]
pub struct SignalSender(mpsc::UnboundedSender<Control>);

impl SignalSender {
    /// Asks for `signo` to be sent to the command's process group. Returns `false` when the exec
    /// has already ended.
    pub fn send(&self, signo: i32) -> bool {
        self.0.send(Control::Signal(signo)).is_ok()
    }

    /// Tells a `tty` exec that the terminal's size changed. Returns `false` when the exec has
    /// already ended.
    pub fn resize(&self, size: WindowSize) -> bool {
        self.0.send(Control::Resize(size)).is_ok()
    }
}

/// The receiving end of a [`SignalSender`].
#[derive(Debug)]
pub struct Signals(mpsc::UnboundedReceiver<Control>);

/// How an exec started with [`Client::exec_full`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The command's status (after a timeout, normally death by `SIGKILL`).
    pub exit: Exit,
    /// The timeout passed and the client killed the command's process group.
    pub timed_out: bool,
}

/// After a timeout's `SIGKILL`, how long the client waits for the agent's `Exit` before it
/// closes the connection (which also makes the agent kill the group).
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// A pair for forwarding signals (e.g. Ctrl-C) to an exec.
pub fn signal_channel() -> (SignalSender, Signals) {
    let (tx, rx) = mpsc::unbounded_channel();
    (SignalSender(tx), Signals(rx))
}

/// A handle on an agent at one address.
#[derive(Debug, Clone)]
pub struct Client {
    addr: Addr,
    agent: Hello,
}

/// One connection after the `Hello` exchange.
struct Conn {
    reader: FrameReader<ReadHalf>,
    w: WriteHalf,
}

impl Client {
    /// Checks that an agent answers at `addr` (one connection: `Hello` and close).
    pub async fn connect(addr: &Addr) -> Result<Client, ClientError> {
        let mut client = Client {
            addr: addr.clone(),
            agent: Hello {
                version: 0,
                software: String::new(),
                features: Vec::new(),
            },
        };
        let (_, hello) = client.open().await?;
        client.agent = hello;
        Ok(client)
    }

    /// The agent's `Hello`: its protocol version and software.
    pub fn agent(&self) -> &Hello {
        &self.agent
    }

    /// The agent's address.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// One ping: opens a connection, exchanges `Hello`s and `Ping`/`Pong`. Returns the time the
    /// whole request took, connection included.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let (mut conn, _) = self.open().await?;
        self.send(&mut conn.w, &Message::Ping).await?;
        match self.reply(&mut conn, "Pong").await? {
            Message::Pong => Ok(start.elapsed()),
            other => Err(self.unexpected("Pong", &other)),
        }
    }

    /// What the agent knows about its guest.
    pub async fn info(&self) -> Result<Info, ClientError> {
        let (mut conn, _) = self.open().await?;
        self.send(&mut conn.w, &Message::InfoRequest).await?;
        match self.reply(&mut conn, "Info").await? {
            Message::Info(info) => Ok(info),
            other => Err(self.unexpected("Info", &other)),
        }
    }

    /// Runs a command and streams its output to `stdout` and `stderr` as it arrives (each chunk
    /// is written and flushed before the next is read). With `stdin`, its bytes are forwarded and
    /// its EOF closes the command's stdin; without, the command's stdin is `/dev/null`.
    ///
    /// Dropping the returned future closes the connection, and the agent kills the command's
    /// process group.
    pub async fn exec<I, O, E>(
        &self,
        req: Exec,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
    ) -> Result<Exit, ClientError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let (_keep, signals) = signal_channel();
        self.exec_with_signals(req, stdin, stdout, stderr, signals)
            .await
    }

    /// [`Client::exec`], also forwarding the signals sent on `signals`' [`SignalSender`].
    pub async fn exec_with_signals<I, O, E>(
        &self,
        req: Exec,
        stdin: Option<I>,
        stdout: O,
        stderr: E,
        signals: Signals,
    ) -> Result<Exit, ClientError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        self.exec_full(req, None, stdin, stdout, stderr, signals, None)
            .await
            .map(|f| f.exit)
    }

    /// The general exec: [`Client::exec_with_signals`], where `script` (for `vmlink run`) is
    /// sent for the agent to run (`req.argv[0]` names it, the rest are its arguments), and after
    /// `timeout` the command's process group is killed (`SIGKILL`) and the result says so.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec_full<I, O, E>(
        &self,
        mut req: Exec,
        script: Option<&[u8]>,
        stdin: Option<I>,
        mut stdout: O,
        mut stderr: E,
        mut signals: Signals,
        timeout: Option<Duration>,
    ) -> Result<Finished, ClientError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        req.stdin = stdin.is_some();
        let (conn, hello) = self.open().await?;
        let needs = [
            (req.tty, "tty", "a terminal (-t)"),
            (
                req.user.is_some(),
                "user",
                "running as another user (--user)",
            ),
            (script.is_some(), "run", "running scripts (vmlink run)"),
        ];
        for (needed, feature, what) in needs {
            self.require(&hello, needed, feature, what)?;
        }
        // Keep to the stdin window where the agent acknowledges input: then it always reads
        // this connection, and a signal or a hang-up behind unread input acts at once.
        let windowed = req.stdin && hello.features.iter().any(|f| f == "stdin_window");
        req.stdin_window = windowed;
        let acked = AtomicU64::new(0);
        let ack_ready = tokio::sync::Notify::new();
        let Conn { mut reader, mut w } = conn;
        let sent = match script {
            None => self.send(&mut w, &Message::Exec(req)).await,
            Some(script) => {
                let run = Run {
                    exec: req,
                    size: script.len() as u64,
                };
                let mut sent = self.send(&mut w, &Message::Run(run)).await;
                for chunk in script.chunks(MAX_DATA_CHUNK) {
                    if sent.is_err() {
                        break;
                    }
                    sent = self.send(&mut w, &Message::Data(chunk.to_vec())).await;
                }
                sent
            }
        };
        if let Err(e) = sent {
            // The agent may have refused and closed: its Error says why.
            return match tokio::time::timeout(REPLY_TIMEOUT, reader.next()).await {
                Ok(Ok(Some(m @ Message::Error(_)))) => Err(self.unexpected("Exit", &m)),
                _ => Err(e),
            };
        }
        let kill = tokio::sync::Notify::new();
        let mut timed_out = false;
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let grace = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(grace);

        // The uplink owns the write half: stdin data, its EOF, and signals, in the order they
        // happen. It runs beside the downlink below, in this task, so neither waits for the other.
        let uplink = async {
            let mut input = stdin;
            let mut buf = vec![0u8; MAX_DATA_CHUNK];
            let mut signals_open = true;
            let mut sent = 0u64;
            while input.is_some() || signals_open {
                // Room in the window: stdin is read no further ahead than the agent takes it.
                let room = if windowed {
                    let in_flight = sent.saturating_sub(acked.load(Ordering::Relaxed));
                    usize::try_from(STDIN_WINDOW.saturating_sub(in_flight))
                        .unwrap_or(usize::MAX)
                        .min(MAX_DATA_CHUNK)
                } else {
                    MAX_DATA_CHUNK
                };
                tokio::select! {
                    n = async {
                        match &mut input {
                            Some(i) => i.read(&mut buf[..room]).await,
                            None => std::future::pending().await,
                        }
                    }, if input.is_some() && room > 0 => {
                        let n = n.map_err(|source| ClientError::Local { what: "stdin", source })?;
                        if n == 0 {
                            input = None;
                            self.send(&mut w, &Message::StdinEof).await?;
                        } else {
                            sent += n as u64;
                            self.send(&mut w, &Message::Stdin(buf[..n].to_vec())).await?;
                        }
                    }
                    () = ack_ready.notified(), if input.is_some() && room == 0 => {}
                    control = signals.0.recv(), if signals_open => match control {
                        Some(Control::Signal(signo)) => {
                            self.send(&mut w, &Message::Signal(Signal { signo })).await?
                        }
                        Some(Control::Resize(size)) => {
                            self.send(&mut w, &Message::Resize(size)).await?
                        }
                        None => signals_open = false,
                    },
                    () = kill.notified() => {
                        let signo = libc::SIGKILL;
                        self.send(&mut w, &Message::Signal(Signal { signo })).await?
                    }
                }
            }
            // Keep the connection open (the agent reads its end as "client gone"), and still
            // send the timeout's kill.
            loop {
                kill.notified().await;
                let signo = libc::SIGKILL;
                self.send(&mut w, &Message::Signal(Signal { signo }))
                    .await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), ClientError>(())
        };
        // The downlink: output to the local stdout/stderr until `Exit`. A local writer that
        // stops taking output holds only this future: the uplink (stdin, signals) and the
        // deadline go on.
        let downlink = async {
            loop {
                match reader.next().await {
                    Ok(Some(Message::Stdout(data))) => {
                        local_write(&mut stdout, &data, "stdout").await?
                    }
                    Ok(Some(Message::Stderr(data))) => {
                        local_write(&mut stderr, &data, "stderr").await?
                    }
                    Ok(Some(Message::Exit(exit))) => return Ok(exit),
                    Ok(Some(Message::StdinAck(ack))) => {
                        // Acknowledging more than was sent gains a peer nothing: saturate.
                        let total = acked.load(Ordering::Relaxed).saturating_add(ack.bytes);
                        acked.store(total, Ordering::Relaxed);
                        ack_ready.notify_one();
                    }
                    Ok(Some(other)) => {
                        return Err(self.unexpected("Stdout, Stderr or Exit", &other))
                    }
                    Ok(None) => {
                        return Err(ClientError::Closed {
                            addr: self.addr.to_string(),
                            waiting_for: "the command's exit status",
                        })
                    }
                    Err(source) => return Err(self.wire(source)),
                }
            }
        };
        tokio::pin!(uplink);
        tokio::pin!(downlink);
        // An uplink that fails (the agent sent Exit and closed while stdin was still flowing)
        // is not the end yet: the Exit may still be on its way down, so it gets REPLY_TIMEOUT.
        let mut up_error: Option<ClientError> = None;
        let mut up_done = false;
        let up_grace = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(up_grace);
        loop {
            tokio::select! {
                r = &mut uplink, if !up_done => {
                    up_done = true;
                    if let Err(e) = r {
                        up_error = Some(e);
                        up_grace.as_mut().reset(tokio::time::Instant::now() + REPLY_TIMEOUT);
                    }
                }
                () = &mut up_grace, if up_error.is_some() => {
                    if let Some(e) = up_error.take() {
                        return Err(e);
                    }
                }
                () = &mut deadline, if !timed_out => {
                    timed_out = true;
                    kill.notify_one();
                    grace.as_mut().reset(tokio::time::Instant::now() + KILL_GRACE);
                }
                () = &mut grace, if timed_out => {
                    // No Exit (e.g. the group's leader had exited and something else held the
                    // output open): closing the connection makes the agent kill what it can.
                    return Ok(Finished {
                        exit: Exit { code: None, signal: Some(libc::SIGKILL) },
                        timed_out,
                    });
                }
                exit = &mut downlink => {
                    return match exit {
                        Ok(exit) => Ok(Finished { exit, timed_out }),
                        // The uplink's failure came first and says more.
                        Err(e) => Err(up_error.take().unwrap_or(e)),
                    };
                }
            }
        }
    }

    /// The checksum copies with this agent use (XXH64 when the agent has it, else SHA-256).
    pub fn copy_checksum(&self) -> Checksum {
        checksum_for(&self.agent)
    }

    /// Copies `source` to `dest` (absolute) in the guest, on a connection of its own. `progress`
    /// counts the file bytes sent. Returns once the agent has committed everything (every file
    /// checksummed, `fsync`ed and renamed into place).
    ///
    /// `dest` as for `cp`: into it when it is an existing directory (unless the source is a
    /// reader, which is written as exactly `dest`), else as it.
    pub async fn put(
        &self,
        source: PutSource,
        dest: &str,
        progress: Arc<AtomicU64>,
    ) -> Result<CopySummary, ClientError> {
        let copy_err = |source| self.copy_error(source);
        let follow = matches!(source, PutSource::Followed(_));
        let (exact, produce): (bool, Producer) = match source {
            PutSource::Path(path) | PutSource::Followed(path) => {
                let named = if path.file_name().is_some() {
                    path.clone()
                } else {
                    // `.`, `..`, `dir/..`: the directory's real name.
                    std::fs::canonicalize(&path).map_err(|source| {
                        copy_err(FilesError::Io {
                            op: "resolve",
                            path: path.clone(),
                            error: source,
                        })
                    })?
                };
                let name = named
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        copy_err(FilesError::Unsupported(format!(
                            "{path:?} names no file or directory"
                        )))
                    })?;
                (
                    false,
                    Box::new(move |sink: &files::FrameSink| {
                        if follow {
                            let target =
                                std::fs::canonicalize(&path).map_err(|error| FilesError::Io {
                                    op: "follow",
                                    path: path.clone(),
                                    error,
                                })?;
                            files::send_tree(sink, &target, &name)
                        } else {
                            files::send_tree(sink, &path, &name)
                        }
                    }),
                )
            }
            PutSource::Reader(mut r) => {
                let name = std::path::Path::new(dest)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        copy_err(FilesError::Unsupported(format!(
                            "{dest:?} names no file to write stdin to"
                        )))
                    })?;
                (
                    true,
                    Box::new(move |sink: &files::FrameSink| {
                        files::send_stream(sink, &mut r, &name)
                    }),
                )
            }
        };
        let (conn, hello) = self.open().await?;
        let Conn { mut reader, mut w } = conn;
        let checksum = checksum_for(&hello);
        let put = Put {
            path: dest.to_string(),
            exact,
            checksum,
        };
        self.send(&mut w, &Message::Put(put)).await?;
        let sending = files::send_frames(&mut w, progress, checksum, produce);
        tokio::pin!(sending);
        let mut sent: Option<CopySummary> = None;
        // Armed once the last frame is written: an agent that takes the whole copy and never
        // answers must not hold the client for ever.
        let answer_by = tokio::time::sleep(COPY_REPLY_TIMEOUT);
        let mut within = COPY_REPLY_TIMEOUT;
        tokio::pin!(answer_by);
        loop {
            tokio::select! {
                r = &mut sending, if sent.is_none() => match r {
                    Ok(summary) => {
                        sent = Some(summary);
                        within = commit_timeout(summary.bytes);
                        answer_by.as_mut().reset(tokio::time::Instant::now() + within);
                    }
                    Err(FilesError::Wire(e)) => {
                        // The agent may have failed and closed: its Error says why.
                        return match tokio::time::timeout(COPY_REPLY_TIMEOUT, reader.next()).await {
                            Ok(Ok(Some(m @ Message::Error(_)))) => Err(self.unexpected("Done", &m)),
                            _ => Err(self.wire(e)),
                        };
                    }
                    Err(e) => return Err(copy_err(e)),
                },
                () = &mut answer_by, if sent.is_some() => {
                    return Err(ClientError::Timeout {
                        addr: self.addr.to_string(),
                        waiting_for: "final Done (the whole copy was sent; its commit is unconfirmed)",
                        within,
                    });
                }
                m = reader.next() => return match m {
                    Ok(Some(Message::Done)) => match sent {
                        Some(s) => Ok(s),
                        None => (&mut sending).await.map_err(copy_err),
                    },
                    Ok(Some(other)) => Err(self.unexpected("Done", &other)),
                    Ok(None) => Err(ClientError::Closed {
                        addr: self.addr.to_string(),
                        waiting_for: "the end of the copy",
                    }),
                    Err(source) => Err(self.wire(source)),
                },
            }
        }
    }

    /// Copies `src` (absolute) from the guest to `dest`, on a connection of its own. `progress`
    /// counts the file bytes received. Files are written atomically and checksummed as by the
    /// agent; symlinks are copied as symlinks.
    pub async fn get(
        &self,
        src: &str,
        dest: GetDest,
        progress: Arc<AtomicU64>,
    ) -> Result<CopySummary, ClientError> {
        self.get_with(src, dest, progress, false).await
    }

    /// [`Client::get`], and with `follow` symlinks at `src` itself are followed (`cp -L`):
    /// the copy is of what `src` names, under `src`'s own name. An agent without the feature
    /// `follow` is refused it, except with [`GetDest::Writer`], which only a regular file can
    /// reach anyway: such an agent is then asked without it.
    pub async fn get_with(
        &self,
        src: &str,
        dest: GetDest,
        progress: Arc<AtomicU64>,
        follow: bool,
    ) -> Result<CopySummary, ClientError> {
        let to_writer = matches!(dest, GetDest::Writer(_));
        let receiver = match dest {
            GetDest::Path(p) => {
                Receiver::new(&p, false, progress).map_err(|e| self.copy_error(e))?
            }
            GetDest::Writer(w) => Receiver::to_writer(w, progress),
        };
        // The agent names the root after `src`, as `Path::file_name` does; it may not pick
        // another name (that would choose which file in a local directory gets written). A
        // `src` with no name (`/`) is refused by the agent; "" matches no entry.
        let name = Path::new(src).file_name().and_then(|n| n.to_str());
        let receiver = receiver.expect_root(name.unwrap_or_default());
        let (conn, hello) = self.open().await?;
        let Conn { mut reader, mut w } = conn;
        let checksum = checksum_for(&hello);
        let follow = follow && (!to_writer || hello.features.iter().any(|f| f == "follow"));
        self.require(&hello, follow, "follow", "following a symlink (cp -L)")?;
        let get = Get {
            path: src.to_string(),
            checksum,
            follow,
        };
        self.send(&mut w, &Message::Get(get)).await?;
        files::receive_frames(&mut reader, receiver.checksum(checksum))
            .await
            .map_err(|e| self.copy_error(e))
    }

    /// Tails a file in the guest (`vmlink logs`): writes the last `req.lines` lines to `out`,
    /// and with `req.follow`, what is appended, until the agent ends (never, normally: the
    /// caller stops following by dropping the future).
    pub async fn logs<O: AsyncWrite + Unpin>(
        &self,
        req: Logs,
        mut out: O,
    ) -> Result<(), ClientError> {
        let (conn, hello) = self.open().await?;
        self.require(&hello, true, "logs", "tailing files (vmlink logs)")?;
        let Conn { mut reader, mut w } = conn;
        self.send(&mut w, &Message::Logs(req)).await?;
        loop {
            match reader.next().await {
                Ok(Some(Message::Data(d))) => local_write(&mut out, &d, "stdout").await?,
                Ok(Some(Message::Done)) => return Ok(()),
                Ok(Some(other)) => return Err(self.unexpected("Data or Done", &other)),
                Ok(None) => {
                    return Err(ClientError::Closed {
                        addr: self.addr.to_string(),
                        waiting_for: "the end of the file",
                    })
                }
                Err(source) => return Err(self.wire(source)),
            }
        }
    }

    /// Fails when `needed` and the agent did not announce `feature` in its `Hello` (an older
    /// agent would refuse the request, or ignore the field).
    fn require(
        &self,
        hello: &Hello,
        needed: bool,
        feature: &'static str,
        what: &'static str,
    ) -> Result<(), ClientError> {
        if needed && !hello.features.iter().any(|f| f == feature) {
            return Err(ClientError::Unsupported {
                addr: self.addr.to_string(),
                what,
                software: hello.software.clone(),
            });
        }
        Ok(())
    }

    fn copy_error(&self, e: FilesError) -> ClientError {
        match e {
            FilesError::Peer { kind, message } => self.unexpected(
                "a copy",
                &Message::Error(vmlink_proto::agent::ErrorMessage { kind, message }),
            ),
            FilesError::Wire(source) => self.wire(source),
            source => ClientError::Copy {
                addr: self.addr.to_string(),
                source,
            },
        }
    }

    /// Opens a connection and exchanges `Hello`s.
    async fn open(&self) -> Result<(Conn, Hello), ClientError> {
        let stream =
            AsyncStream::connect(&self.addr)
                .await
                .map_err(|source| ClientError::Connect {
                    addr: self.addr.to_string(),
                    source,
                })?;
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: FrameReader::new(r),
            w,
        };
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            software: concat!("vmlink/", env!("CARGO_PKG_VERSION")).to_string(),
            features: Vec::new(),
        });
        // An agent that refuses us may have closed already; its Error frame is still readable,
        // so a failed write is judged by what we read next.
        let sent = self.send(&mut conn.w, &hello).await;
        let reply = self.reply(&mut conn, "Hello").await;
        match (reply, sent) {
            (Ok(Message::Hello(h)), Ok(())) if h.version >= PROTOCOL_VERSION => Ok((conn, h)),
            (Ok(Message::Hello(h)), Ok(())) => Err(ClientError::Version {
                addr: self.addr.to_string(),
                version: h.version,
            }),
            (Ok(Message::Hello(_)), Err(e)) => Err(e),
            (Ok(other), _) => Err(self.unexpected("Hello", &other)),
            (Err(e), _) => Err(e),
        }
    }

    async fn send(&self, w: &mut WriteHalf, m: &Message) -> Result<(), ClientError> {
        write_message(w, m).await.map_err(|e| self.wire(e))
    }

    /// The next message within [`REPLY_TIMEOUT`]; an `Error` frame becomes an error.
    async fn reply(
        &self,
        conn: &mut Conn,
        waiting_for: &'static str,
    ) -> Result<Message, ClientError> {
        let addr = || self.addr.to_string();
        match tokio::time::timeout(REPLY_TIMEOUT, conn.reader.next()).await {
            Err(_) => Err(ClientError::Timeout {
                addr: addr(),
                waiting_for,
                within: REPLY_TIMEOUT,
            }),
            Ok(Ok(Some(Message::Error(e)))) if e.kind == ErrorKind::Refused => {
                Err(ClientError::Refused {
                    addr: addr(),
                    message: e.message,
                })
            }
            Ok(Ok(Some(Message::Error(e)))) => Err(ClientError::Agent {
                addr: addr(),
                kind: e.kind,
                message: e.message,
            }),
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(ClientError::Closed {
                addr: addr(),
                waiting_for,
            }),
            Ok(Err(source)) => Err(self.wire(source)),
        }
    }

    fn unexpected(&self, expected: &'static str, got: &Message) -> ClientError {
        match got {
            Message::Error(e) if e.kind == ErrorKind::Refused => ClientError::Refused {
                addr: self.addr.to_string(),
                message: e.message.clone(),
            },
            Message::Error(e) => ClientError::Agent {
                addr: self.addr.to_string(),
                kind: e.kind,
                message: e.message.clone(),
            },
            other => ClientError::Unexpected {
                addr: self.addr.to_string(),
                expected,
                got: other.message_type(),
            },
        }
    }

    fn wire(&self, source: WireError) -> ClientError {
        ClientError::Wire {
            addr: self.addr.to_string(),
            source,
        }
    }
}

/// The checksum a copy with this agent uses: XXH64 when it announces it, else SHA-256 (the
/// protocol's default, which every version-1 agent has).
fn checksum_for(agent: &Hello) -> Checksum {
    if agent.features.iter().any(|f| f == "xxh64") {
        Checksum::Xxh64
    } else {
        Checksum::Sha256
    }
}

async fn local_write<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    what: &'static str,
) -> Result<(), ClientError> {
    let r = async {
        w.write_all(data).await?;
        w.flush().await
    };
    r.await
        .map_err(|source| ClientError::Local { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlink_transport::AsyncListener;

    /// A Unix socket for a fake agent, with the address a client connects to.
    fn fake_agent_socket(tag: &str) -> (AsyncListener, Addr) {
        let path =
            std::env::temp_dir().join(format!("vmlink-client-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listen: Addr = format!("unix-listen:{}", path.display())
            .parse()
            .expect("address");
        let listener = AsyncListener::bind(&listen).expect("bind");
        let addr = crate::connect_addr_for(listener.local_addr()).expect("connect address");
        (listener, addr)
    }

    #[test]
    fn the_agents_text_reaches_the_terminal_without_control_characters() {
        let hostile = "\u{1b}]0;pwned\u{7}\u{1b}[2J";
        let addr = "unix:/run/agent.sock".to_string();
        let errors = [
            ClientError::Agent {
                addr: addr.clone(),
                kind: ErrorKind::Io,
                message: format!("no such file{hostile}"),
            },
            ClientError::Refused {
                addr: addr.clone(),
                message: hostile.to_string(),
            },
            ClientError::Unsupported {
                addr: addr.clone(),
                what: "tailing files (vmlink logs)",
                software: format!("vmlink-agent/9{hostile}"),
            },
        ];
        for e in errors {
            let shown = e.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert!(shown.contains(r"\u{1b}]0;pwned\u{7}\u{1b}[2J"), "{shown}");
        }
        // Ordinary text, non-ASCII included, is shown as sent.
        let e = ClientError::Agent {
            addr,
            kind: ErrorKind::Io,
            message: "Datei „grüße.txt“ fehlt".into(),
        };
        assert!(e.to_string().ends_with(": Datei „grüße.txt“ fehlt"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_the_agent_takes_whole_but_never_confirms_fails_after_copy_reply_timeout() {
        let (listener, addr) = fake_agent_socket("silent-put");
        // Answers the Hellos, then reads the whole Put and never says another word.
        let agent = tokio::spawn(async move {
            loop {
                let stream = listener.accept().await.expect("accept");
                let (r, mut w) = stream.into_split();
                let mut reader = FrameReader::new(r);
                match reader.next().await {
                    Ok(Some(Message::Hello(_))) => {}
                    other => panic!("expected Hello, got {other:?}"),
                }
                let hello = Message::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    software: "silent-agent".into(),
                    features: Vec::new(),
                });
                write_message(&mut w, &hello).await.expect("hello");
                match reader.next().await {
                    // `Client::connect`'s connection: only the Hello.
                    Ok(None) => continue,
                    Ok(Some(Message::Put(_))) => {}
                    other => panic!("expected Put, got {other:?}"),
                }
                let mut saw_done = false;
                while let Ok(Some(m)) = reader.next().await {
                    saw_done |= matches!(m, Message::Done);
                }
                return saw_done;
            }
        });
        let client = Client::connect(&addr).await.expect("connect");
        let start = tokio::time::Instant::now();
        let data = std::io::Cursor::new(vec![7u8; 300_000]);
        let put = client.put(
            PutSource::Reader(Box::new(data)),
            "/tmp/never-confirmed",
            Arc::default(),
        );
        let got = tokio::time::timeout(COPY_REPLY_TIMEOUT * 3, put)
            .await
            .expect("the put gave up on the silent agent (it hung)");
        match got {
            Err(e @ ClientError::Timeout { within, .. }) => {
                assert_eq!(within, COPY_REPLY_TIMEOUT);
                let text = e.to_string();
                assert!(text.contains("final Done"), "{text}");
            }
            other => panic!("a silent agent gave {other:?}"),
        }
        let waited = start.elapsed();
        assert!(
            waited >= COPY_REPLY_TIMEOUT && waited < COPY_REPLY_TIMEOUT * 2,
            "gave up after {waited:?}"
        );
        // A big copy's commit may take longer: one second more per 10 MiB.
        assert_eq!(commit_timeout(300_000), COPY_REPLY_TIMEOUT);
        assert_eq!(
            commit_timeout(1 << 30),
            COPY_REPLY_TIMEOUT + Duration::from_secs(102)
        );
        drop(client);
        assert!(
            agent.await.expect("the fake agent"),
            "the agent read the whole copy (its Done) before the client gave up"
        );
    }
}
