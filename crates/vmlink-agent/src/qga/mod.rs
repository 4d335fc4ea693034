//! # qemu-guest-agent's protocol, served by vmlink-agent
//!
//! `vmlink-agent --qga ADDR` answers the QMP-style JSON protocol of qemu-ga (framing and request
//! checks in `vmlink_proto::qga`), so libvirt (`virsh qemu-agent-command`, `virsh
//! domifaddr --source agent`), Proxmox and other hosts that speak only qemu-ga work unchanged.
//! Differences from qemu-ga that a host could notice are listed in `docs/qga-compat.md`.
//!
//! ## Channels
//!
//! - A listening address (`unix-listen:`, `vsock-listen:`) serves every accepted connection,
//!   each as its own task.
//! - Any other address (the default, `vport:org.qemu.guest_agent.0`) is one stream, opened
//!   once and served across host connections, as qemu-ga does: EOF means the host side closed,
//!   the request parser is reset and reading goes on. A virtio-serial port whose host side is
//!   not connected reads as EOF at once and offers no event for "connected", so a read that
//!   found EOF without data is retried after [`REOPEN_BACKOFF`]. The port is not closed and
//!   re-opened in between: the guest kernel would drop what the next host client sent before
//!   the re-open. Only an I/O error makes it re-open the address.
//!
//! Requests on one connection are answered in order, one at a time, as qemu-ga does. State that
//! outlives a connection (open file handles, started processes) is shared by all of them, also
//! as in qemu-ga: a host may open a file on one connection and read it on the next.
//!
//! ## Bounds
//!
//! - A message: 64 MiB and 1024 levels of nesting (`vmlink_proto::qga`).
//! - `guest-exec` output: [`MAX_EXEC_OUTPUT`] (16 MiB) per stream is kept; the rest is read and
//!   dropped, and `out-truncated`/`err-truncated` say so. At most [`MAX_EXECS`] finished or
//!   running processes are tracked; a finished one is forgotten once `guest-exec-status` has
//!   reported it.
//! - `guest-file-read`: at most [`MAX_READ_COUNT`] (48 MiB) per call, default 4096;
//!   at most [`MAX_FILE_HANDLES`] open handles.

mod commands;
mod system;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};
use vmlink_proto::qga::{
    encode_error, encode_return, parse_request, Decoder, ErrorReply, Frame, COMMAND_NOT_FOUND,
};
use vmlink_transport::{Addr, AsyncListener, AsyncStream};

pub use commands::{COMMANDS, FROZEN_ALLOWED};

/// The address qemu-ga uses, and libvirt and Proxmox wire: the virtio-serial port.
pub const DEFAULT_QGA_ADDR: &str = "vport:org.qemu.guest_agent.0";
/// Output kept per stream of one `guest-exec` (qemu-ga's bound too).
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// Processes tracked at once by `guest-exec`.
pub const MAX_EXECS: usize = 1024;
/// Largest `count` of one `guest-file-read`.
pub const MAX_READ_COUNT: i64 = 48 << 20;
/// Open `guest-file-open` handles at once.
pub const MAX_FILE_HANDLES: usize = 1024;
/// Wait before reading again a stream that reported EOF without data, or re-opening it after
/// an I/O error.
pub const REOPEN_BACKOFF: Duration = Duration::from_millis(200);

/// Which commands are served.
#[derive(Debug, Clone, Default)]
pub struct QgaPolicy {
    /// `--allow-rpcs`: when set, only these commands are enabled.
    pub allow: Option<BTreeSet<String>>,
    /// `--block-rpcs`: these commands are disabled.
    pub block: BTreeSet<String>,
}

impl QgaPolicy {
    /// Whether `command` is enabled. Unknown names are irrelevant: they are not found anyway.
    pub fn enabled(&self, command: &str) -> bool {
        !self.block.contains(command) && self.allow.as_ref().is_none_or(|a| a.contains(command))
    }

    /// Parses qemu-ga's comma lists (`--allow-rpcs`, `--block-rpcs`).
    pub fn from_lists(allow: Option<&str>, block: Option<&str>) -> QgaPolicy {
        let split = |s: &str| {
            s.split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect::<BTreeSet<_>>()
        };
        QgaPolicy {
            allow: allow.map(split),
            block: block.map(split).unwrap_or_default(),
        }
    }
}

/// Why the qga server stopped.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The address could not be bound or opened.
    #[error("cannot serve the qemu-guest-agent protocol on {addr}")]
    Transport {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: vmlink_transport::Error,
    },
}

/// How long an agent asked to stop while filesystems are frozen goes on serving, for the host
/// to thaw them (its snapshot taken), before it thaws them itself and stops. qemu-ga on Linux
/// ignores SIGTERM while frozen instead (and a SIGKILL then leaves the guest frozen); on
/// Windows it waits for its 10 s freeze limit.
pub const STOP_WHILE_FROZEN: Duration = Duration::from_secs(10);

/// State shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) policy: QgaPolicy,
    pub(crate) files: Mutex<commands::Files>,
    pub(crate) execs: Mutex<HashMap<u32, commands::ExecSlot>>,
    /// Filesystems are frozen (`guest-fsfreeze-freeze`): only [`FROZEN_ALLOWED`] is served.
    pub(crate) frozen: AtomicBool,
    /// Notified whenever `frozen` goes back to false.
    pub(crate) thawed: tokio::sync::Notify,
    /// Held by a freeze or a thaw while it runs (on a blocking thread, so a request dropped
    /// meanwhile does not let go of it): the thaw on the way out waits for a freeze in flight.
    pub(crate) fs: Mutex<()>,
    /// The server is stopping: no new freeze is started.
    pub(crate) stopping: AtomicBool,
}

impl State {
    fn new(policy: QgaPolicy) -> State {
        State {
            policy,
            files: Mutex::new(commands::Files::default()),
            execs: Mutex::new(HashMap::new()),
            frozen: AtomicBool::new(false),
            thawed: tokio::sync::Notify::new(),
            fs: Mutex::new(()),
            stopping: AtomicBool::new(false),
        }
    }

    /// Marks the filesystems thawed. [`State::until_thawed`] wakes once the answer that says so
    /// has been written (see `serve_stream`), so an agent stopping on the thaw still sends it.
    pub(crate) fn set_thawed(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Completes once nothing is frozen.
    async fn until_thawed(&self) {
        loop {
            let notified = self.thawed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.frozen.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Whether `command` may run now: allowed by the policy, and not shut off by a freeze.
    pub(crate) fn enabled(&self, command: &str) -> bool {
        self.policy.enabled(command)
            && (!self.frozen.load(Ordering::SeqCst) || FROZEN_ALLOWED.contains(&command))
    }
}

/// Where the qga protocol is served: a listener, or one stream that is re-opened.
#[derive(Debug)]
pub enum QgaChannel {
    /// A listening address: every connection is served.
    Listener(AsyncListener),
    /// A stream address (a vport): served, and re-opened after EOF.
    Stream(Addr, AsyncStream),
}

impl QgaChannel {
    /// Binds (listening addresses) or opens (the others) `addr`.
    pub async fn open(addr: &Addr) -> Result<QgaChannel, QgaError> {
        let transport = |source| QgaError::Transport {
            addr: addr.to_string(),
            source,
        };
        if addr.is_listen() {
            Ok(QgaChannel::Listener(
                AsyncListener::bind(addr).map_err(transport)?,
            ))
        } else {
            let stream = AsyncStream::connect(addr).await.map_err(transport)?;
            Ok(QgaChannel::Stream(addr.clone(), stream))
        }
    }

    /// The address served (for a listener, as bound).
    pub fn local_addr(&self) -> &Addr {
        match self {
            QgaChannel::Listener(l) => l.local_addr(),
            QgaChannel::Stream(a, _) => a,
        }
    }
}

/// Serves qemu-ga's protocol on `channel` until `shutdown` completes (see the module docs for
/// how listeners and streams differ). Failures to re-open a stream are logged and retried.
/// Filesystems still frozen by `guest-fsfreeze-freeze` are thawed before it returns, as
/// qemu-ga does when it exits: an agent stopped or restarted (SIGTERM, `systemctl restart`)
/// between a backup's freeze and thaw must not leave every writer in the guest hanging.
pub async fn serve_qga(channel: QgaChannel, policy: QgaPolicy, shutdown: impl Future<Output = ()>) {
    let state = Arc::new(State::new(policy));
    let serve = async {
        match channel {
            QgaChannel::Listener(listener) => accept_loop(listener, Arc::clone(&state)).await,
            QgaChannel::Stream(addr, first) => reopen_loop(addr, first, Arc::clone(&state)).await,
        }
    };
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => {}
        () = shutdown => {
            state.stopping.store(true, Ordering::SeqCst);
            if state.frozen.load(Ordering::SeqCst) {
                // A backup froze the guest to take its snapshot and will thaw it in a moment:
                // let it (serving on), but not for long.
                warn!(
                    "stopping while filesystems are frozen: serving on until the host thaws \
                     them, at most {} s",
                    STOP_WHILE_FROZEN.as_secs()
                );
                tokio::select! {
                    () = &mut serve => {}
                    () = state.until_thawed() => {}
                    () = tokio::time::sleep(STOP_WHILE_FROZEN) => {}
                }
            }
        }
    }
    if state.frozen.swap(false, Ordering::SeqCst) {
        let st = Arc::clone(&state);
        let thaw = move || {
            // After a freeze still in flight, if any.
            let _one = st.fs.lock().unwrap_or_else(|e| e.into_inner());
            system::thaw()
        };
        match tokio::task::spawn_blocking(thaw).await {
            Ok(Ok(n)) => warn!("stopping while frozen: thawed {n} filesystem(s)"),
            Ok(Err(e)) => warn!("stopping while frozen: thawing failed: {}", e.desc),
            Err(e) => warn!("stopping while frozen: thawing failed: {e}"),
        }
    }
}

/// Serves an already-open stream until EOF; for tests and embedding.
pub async fn serve_qga_stream(stream: AsyncStream, policy: QgaPolicy) {
    let state = Arc::new(State::new(policy));
    let mut stream = stream;
    serve_stream(&mut stream, &state).await;
}

async fn accept_loop(listener: AsyncListener, state: Arc<State>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        let mut stream = stream;
                        serve_stream(&mut stream, &state).await;
                    });
                }
                Err(e) => {
                    warn!("{}", vmlink_transport::error_chain(&e));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn reopen_loop(addr: Addr, first: AsyncStream, state: Arc<State>) {
    let mut stream = Some(first);
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => match AsyncStream::connect(&addr).await {
                Ok(s) => s,
                Err(e) => {
                    debug!("re-opening {addr}: {}", vmlink_transport::error_chain(&e));
                    tokio::time::sleep(REOPEN_BACKOFF).await;
                    continue;
                }
            },
        };
        match serve_stream(&mut s, &state).await {
            // The host side closed. The descriptor is kept, as qemu-ga does: closing and
            // re-opening the port would make the guest kernel drop whatever the next host
            // client sends in between. Reads return EOF until a host connects again.
            Ended::Eof { got_data } => {
                if !got_data {
                    tokio::time::sleep(REOPEN_BACKOFF).await;
                }
                stream = Some(s);
            }
            Ended::Error => tokio::time::sleep(REOPEN_BACKOFF).await,
        }
    }
}

/// How serving one stream ended.
enum Ended {
    /// The peer closed; whether any byte had arrived.
    Eof { got_data: bool },
    /// An I/O error.
    Error,
}

/// Serves one stream until EOF or an I/O error.
async fn serve_stream(stream: &mut AsyncStream, state: &Arc<State>) -> Ended {
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got_data = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => return Ended::Eof { got_data },
            Ok(n) => n,
            Err(e) => {
                debug!("qga connection: {e}");
                return Ended::Error;
            }
        };
        got_data = true;
        decoder.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            if let Some(answer) = answer(frame, state).await {
                let written = stream.write_all(&answer).await;
                // A thaw's answer is out: a stop that waited for the thaw may go on.
                state.thawed.notify_waiters();
                if let Err(e) = written {
                    debug!("qga connection: {e}");
                    return Ended::Error;
                }
            }
        }
    }
}

/// The bytes to send for one frame, or `None` (a command with no success response).
async fn answer(frame: Frame, state: &Arc<State>) -> Option<Vec<u8>> {
    let msg = match frame {
        Frame::Error(e) => return Some(encode_error(&ErrorReply::generic(e.to_string()), None)),
        Frame::Message(m) => m,
    };
    let request = match parse_request(&msg) {
        Ok(r) => r,
        Err(rejected) => return Some(encode_error(&rejected.error, rejected.id.as_ref())),
    };
    let id = request.id.as_ref();
    let Some(spec) = COMMANDS.iter().find(|c| c.name == request.execute) else {
        let error = ErrorReply {
            class: COMMAND_NOT_FOUND.into(),
            desc: format!("The command {} has not been found", request.execute),
        };
        return Some(encode_error(&error, id));
    };
    if state.frozen.load(Ordering::SeqCst) && !FROZEN_ALLOWED.contains(&spec.name) {
        let error = ErrorReply {
            class: COMMAND_NOT_FOUND.into(),
            desc: format!(
                "Command {} has been disabled: the agent is in frozen state",
                spec.name
            ),
        };
        return Some(encode_error(&error, id));
    }
    if !state.policy.enabled(spec.name) {
        let error = ErrorReply {
            class: COMMAND_NOT_FOUND.into(),
            desc: format!("Command {} has been disabled", spec.name),
        };
        return Some(encode_error(&error, id));
    }
    match commands::dispatch(spec.name, request.arguments, state).await {
        Ok(value) if spec.success_response => Some(encode_return(
            &value,
            id,
            spec.name == "guest-sync-delimited",
        )),
        Ok(_) => None,
        Err(error) => Some(encode_error(&error, id)),
    }
}
