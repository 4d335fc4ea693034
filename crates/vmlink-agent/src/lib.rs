//! # vmlink-agent
//!
//! The guest agent, as a library: [`run`] serves the agent protocol (`docs/agent-protocol.md`)
//! on every listener it is given until `shutdown` completes; the `vmlink-agent` binary is a thin
//! shell over it. [`client`] is the host side.
//!
//! ## One connection per request
//!
//! Every connection starts with a `Hello` exchange and then carries exactly one request: a ping,
//! an info request or one exec. Nothing shares a queue, so a stalled exec (a client that stops
//! reading 1 GiB of output) never delays a ping or a kill on another connection: each connection
//! is its own tokio task, bounded by a semaphore ([`Policy::max_sessions`]).
//!
//! ## qemu-guest-agent's protocol
//!
//! [`serve_qga`] (`vmlink-agent --qga ADDR`) answers qemu-ga's JSON protocol on one more
//! address, so hosts that speak only qemu-ga work unchanged; see [`qga`].
//!
//! ## Exec
//!
//! The command runs in its own process group (`setpgid(0, 0)`). Its stdout and stderr are read
//! in chunks of at most 64 KiB and each chunk is sent as soon as it is read: nothing waits for
//! the process to exit. `Stdin` frames are written to its stdin and `StdinEof` closes it;
//! `Signal` frames are sent to its process group. When the process has exited and both output
//! pipes are at EOF, the agent sends `Exit` and closes. If the client disconnects (or the
//! connection fails) first, the agent kills the process group with `SIGKILL`.
//!
//! ## Who may connect
//!
//! On a vsock listener the agent checks the peer's CID against [`Policy::allow_cids`] before it
//! reads a byte: by default only the host (CID 2). A refused peer gets one `Error` frame of kind
//! `refused` naming its CID, then the connection closes. Other listeners (Unix sockets) are
//! accepted as they are: their filesystem permissions decide who may connect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{debug, warn};
use vmlink_transport::{Addr, AsyncListener};

pub mod client;
mod exec;
pub mod files;
mod framed;
mod logs;
pub mod mux;
pub mod qga;
mod server;

pub use client::Finished;
pub use exec::parse_program_list;
pub use framed::WireError;
pub use qga::{serve_qga, serve_qga_stream, QgaChannel, QgaError, QgaPolicy, DEFAULT_QGA_ADDR};
pub use vmlink_proto::agent::{Exec as ExecRequest, Exit as ExitStatus, Info};

/// The vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 7878;
/// The address the agent listens on when given none: every local CID, [`DEFAULT_PORT`].
pub const DEFAULT_LISTEN: &str = "vsock-listen:any:7878";
/// The vsock CID allowed by default: the host.
pub const HOST_CID: u32 = 2;
/// How many connections the agent serves at once by default.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// How long a connection may take to send its `Hello`, and then its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which vsock peers may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowCids {
    /// Any CID.
    Any,
    /// Only these CIDs.
    Only(Vec<u32>),
}

impl AllowCids {
    /// Whether `cid` may connect.
    pub fn allows(&self, cid: u32) -> bool {
        match self {
            AllowCids::Any => true,
            AllowCids::Only(cids) => cids.contains(&cid),
        }
    }
}

impl std::fmt::Display for AllowCids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowCids::Any => f.write_str("any"),
            AllowCids::Only(cids) => {
                let list: Vec<String> = cids.iter().map(u32::to_string).collect();
                f.write_str(&list.join(", "))
            }
        }
    }
}

/// What the agent allows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// vsock peers that may connect (default: the host, CID 2).
    pub allow_cids: AllowCids,
    /// Connections served at once (default 64); one more gets a `busy` error.
    pub max_sessions: usize,
    /// Which requests a connected peer may make (default: all).
    pub exec: ExecPolicy,
    /// How long a connection may take to send its `Hello`, and then its request
    /// (default [`REQUEST_TIMEOUT`]); a silent one is closed and frees its session.
    pub request_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            allow_cids: AllowCids::Only(vec![HOST_CID]),
            max_sessions: DEFAULT_MAX_SESSIONS,
            exec: ExecPolicy::default(),
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// What a connected peer may do, like qemu-ga's `--allow-rpcs`/`--block-rpcs`: requests it
/// forbids get an `Error` of kind `refused` naming the rule.
///
/// Program rules name a program by a bare name (looked up in the agent's `PATH`) or an absolute
/// path, and match the file the request would run (its directory canonicalized), not the name
/// the request gives: `--allow-exec ls` does not allow `/tmp/ls`. A deny list is a guard rail,
/// not a boundary: any allowed interpreter (`sh`, `python3`) can run a denied program. An allow
/// list without interpreters is a boundary for exec, and forbids `run` (a script).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecPolicy {
    /// Refuse every `Exec` and `Run` (`--no-exec`).
    pub no_exec: bool,
    /// Only these programs may be executed (`--allow-exec`); scripts are refused.
    pub allow: Option<Vec<String>>,
    /// These programs may not be executed (`--deny-exec`).
    pub deny: Vec<String>,
    /// Refuse copies into the guest (`Put`) (`--read-only`).
    pub read_only: bool,
}

/// Why the agent could not serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `run` was given no listener.
    #[error("the agent was given no address to listen on")]
    NoListeners,
    /// `max_sessions` is zero.
    #[error("the agent's session limit must be at least 1")]
    NoSessions,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) policy: Policy,
    pub(crate) channels: Vec<String>,
    pub(crate) sessions: Arc<Semaphore>,
}

/// Serves the agent protocol on every listener until `shutdown` completes.
///
/// When it does, the accept loops stop and every connection task is aborted, which kills the
/// process groups of running commands.
pub async fn run(
    listeners: Vec<AsyncListener>,
    policy: Policy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_all(listeners, Vec::new(), policy, shutdown).await
}

async fn accept_loop(listener: AsyncListener, shared: Arc<Shared>) {
    let addr = listener.local_addr().clone();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let permit = shared.sessions.clone().try_acquire_owned().ok();
                    connections.spawn(server::serve(stream, addr.clone(), shared.clone(), permit));
                }
                Err(e) => {
                    // Local trouble (e.g. out of descriptors): say so, and do not spin.
                    warn!("{}", vmlink_transport::error_chain(&e));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A virtio-serial port pair the agent serves through the stream multiplexer
/// (`docs/serial-mux.md`): requests on the control port, bulk data on the data port.
#[derive(Debug, Clone)]
pub struct SerialPorts {
    /// The control port, e.g. `vport:org.vmlink.ctl`.
    pub ctl: Addr,
    /// The data port, e.g. `vport:org.vmlink.data`; without it everything uses `ctl`.
    pub data: Option<Addr>,
}

/// The virtio-serial control port the agent serves by default (with [`DEFAULT_DATA_PORT`]).
pub const DEFAULT_CTL_PORT: &str = "org.vmlink.ctl";
/// The virtio-serial data port paired with [`DEFAULT_CTL_PORT`].
pub const DEFAULT_DATA_PORT: &str = "org.vmlink.data";

impl SerialPorts {
    /// `vport:NAME` as a control port; its data port is NAME with a final `ctl` replaced by
    /// `data` (`org.vmlink.ctl` -> `org.vmlink.data`), when the guest has such a port.
    pub fn for_ctl(ctl: &Addr) -> Option<SerialPorts> {
        let vmlink_transport::Endpoint::Vport(name) = &ctl.endpoint else {
            return None;
        };
        let data = name.strip_suffix("ctl").and_then(|stem| {
            let data = format!("{stem}data");
            Addr::vport_path(&data)
                .exists()
                .then(|| Addr::new(vmlink_transport::Endpoint::Vport(data)))
        });
        Some(SerialPorts {
            ctl: ctl.clone(),
            data,
        })
    }

    /// What `info` lists for these ports.
    pub fn describe(&self) -> String {
        match &self.data {
            Some(d) => format!("{} (data {})", self.ctl, d),
            None => self.ctl.to_string(),
        }
    }
}

/// Serves the agent protocol on every listener and every serial port pair until `shutdown`
/// completes (see [`run`]). A serial pair is reopened whenever its session ends (the host
/// side disconnected), so the agent outlives bridge and QEMU restarts.
pub async fn run_all(
    listeners: Vec<AsyncListener>,
    serial: Vec<SerialPorts>,
    policy: Policy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if listeners.is_empty() && serial.is_empty() {
        return Err(AgentError::NoListeners);
    }
    if policy.max_sessions == 0 {
        return Err(AgentError::NoSessions);
    }
    let mut channels: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    channels.extend(serial.iter().map(SerialPorts::describe));
    let shared = Arc::new(Shared {
        channels,
        sessions: Arc::new(Semaphore::new(policy.max_sessions)),
        policy,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_loop(listener, shared.clone()));
    }
    for ports in serial {
        tasks.spawn(serial_loop(ports, shared.clone()));
    }
    shutdown.await;
    debug!("agent shutting down");
    tasks.shutdown().await;
    Ok(())
}

async fn serial_loop(ports: SerialPorts, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let lane = |addr: Addr| async move {
            let s = vmlink_transport::AsyncStream::connect(&addr).await?;
            let (r, w) = s.into_split();
            Ok::<_, vmlink_transport::Error>(mux::Lane {
                r: Box::new(r),
                w: Box::new(w),
            })
        };
        // Opening a port waits until the host side has a client.
        let ctl = match lane(ports.ctl.clone()).await {
            Ok(l) => l,
            Err(e) => {
                warn!("{}", vmlink_transport::error_chain(&e));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // The host connects the data port right after the control port, if at all (a bridge
        // given only CTL): wait for it a while, then serve on the control port alone.
        let data = match &ports.data {
            Some(d) => match lane(with_default_timeout(d, DATA_PORT_WAIT)).await {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(
                        "{}; using the control port only",
                        vmlink_transport::error_chain(&e)
                    );
                    None
                }
            },
            None => None,
        };
        debug!("serial session on {} started", ports.describe());
        let (session, mut incoming) = mux::Mux::start(mux::Role::Guest, ctl, data);
        loop {
            tokio::select! {
                s = incoming.recv() => match s {
                    Some(s) => {
                        let label = format!("{} stream", ports.ctl);
                        let stream = s.into_stream(label);
                        let permit = shared.sessions.clone().try_acquire_owned().ok();
                        connections.spawn(server::serve(stream, ports.ctl.clone(), shared.clone(), permit));
                    }
                    None => break,
                },
                _ = session.closed() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        debug!("serial session on {} ended; reopening", ports.describe());
        // The host side went away: wait a little so a port that reports hang-up at once
        // does not spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a serial session waits for the host side of its data port once the control
/// port's is there. More than the bridge's `END_WRITE_GRACE` (5 s) with room to spare: after
/// a session ends, the old data connection may hold QEMU's chardev that long before the
/// bridge's new one is accepted.
const DATA_PORT_WAIT: Duration = Duration::from_secs(15);

/// `addr` with a connect timeout of `t` unless it names one.
fn with_default_timeout(addr: &Addr, t: Duration) -> Addr {
    let mut a = addr.clone();
    a.options.connect_timeout.get_or_insert(t);
    a
}

/// Parses `--allow-cid` values: numbers, `host` (2), `local` (1), or `any`.
pub fn parse_allow_cids<S: AsRef<str>>(values: &[S]) -> Result<AllowCids, String> {
    if values.is_empty() {
        return Ok(AllowCids::Only(vec![HOST_CID]));
    }
    let mut cids = Vec::new();
    for v in values {
        match v.as_ref() {
            "any" => return Ok(AllowCids::Any),
            "host" => cids.push(HOST_CID),
            "local" => cids.push(1),
            s => cids.push(s.parse().map_err(|_| {
                format!("invalid --allow-cid {s:?}: expected a CID number, host, local or any")
            })?),
        }
    }
    Ok(AllowCids::Only(cids))
}

/// `addr` as an agent would be reached on it: for the listen address `vsock-listen:any:P`
/// seen from inside the same guest, `vsock:1:P`; `unix-listen:PATH` gives `unix:PATH`.
pub fn connect_addr_for(listen: &Addr) -> Option<Addr> {
    let s = listen.to_string();
    let (kind, rest) = s.split_once(':')?;
    let rest = rest.split(',').next()?;
    let connect = match kind {
        "vsock-listen" => {
            let port = rest.rsplit(':').next()?;
            format!("vsock:1:{port}")
        }
        "unix-listen" => format!("unix:{rest}"),
        _ => return None,
    };
    connect.parse().ok()
}
