//! Fixtures for the agent's integration tests.
//!
//! Guest tests use [`guest_test!`]: on the host, the test boots a lab guest that runs this same
//! test binary filtered to this one test; inside the guest the body runs against the real
//! kernel (vsock over `vsock_loopback`, CID 1). A guest that cannot boot fails the test.

#![allow(dead_code)]

pub mod features;
pub mod scenarios;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use vmlink_agent::Policy;
use vmlink_transport::{Addr, AsyncListener};

/// Defines a test whose body runs inside a lab guest with vsock_loopback
/// (`vmlink_lab::guest_test!` with a longer timeout for these tests).
#[macro_export]
macro_rules! guest_test {
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        vmlink_lab::guest_test! {
            $(#[$m])*
            fn $name() cfg {
                vmlink_lab::LabConfig {
                    timeout: Some(std::time::Duration::from_secs(240)),
                    ..vmlink_lab::testing::vsock_lab()
                }
            } $body
        }
    };
}

/// A multi-threaded runtime for a test body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// An agent served in-process by `vmlink_agent::run`, stopped on drop.
pub struct Agent {
    /// The address a client in the same machine reaches it on.
    pub addr: Addr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts an agent listening on `listen` (e.g. `vsock-listen:any`) with `policy`.
pub fn start_agent(listen: &str, policy: Policy) -> Agent {
    let listen: Addr = listen.parse().expect("listen address");
    let listener = AsyncListener::bind(&listen).expect("bind the agent's listener");
    let addr = vmlink_agent::connect_addr_for(listener.local_addr()).expect("a connect address");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        vmlink_agent::run(vec![listener], policy, shutdown)
            .await
            .expect("agent runs");
    });
    Agent {
        addr,
        stop: Some(stop),
    }
}

/// A fresh Unix socket path in the temp directory.
pub fn socket_path(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir()
        .join(format!(
            "vmlink-agent-{tag}-{}-{n}.sock",
            std::process::id()
        ))
        .display()
        .to_string()
}

/// The policy the guest tests use: the client is in the same guest, over vsock_loopback (CID 1).
pub fn loopback_policy() -> Policy {
    Policy {
        allow_cids: vmlink_agent::AllowCids::Only(vec![1]),
        ..Policy::default()
    }
}

/// An `AsyncWrite` that records when each write arrived.
#[derive(Default)]
pub struct Stamped {
    pub writes: Vec<(SystemTime, Vec<u8>)>,
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .writes
            .push((SystemTime::now(), buf.to_vec()));
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An `AsyncWrite` that counts and hashes what it is given, and keeps the first bytes.
#[derive(Default)]
pub struct Hashing {
    pub len: u64,
    pub sha: Sha256,
    pub head: Vec<u8>,
}

impl Hashing {
    pub fn digest(self) -> Vec<u8> {
        self.sha.finalize().to_vec()
    }
}

impl AsyncWrite for Hashing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.len += buf.len() as u64;
        this.sha.update(buf);
        if this.head.len() < 4096 {
            this.head.extend_from_slice(&buf[..buf.len().min(4096)]);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An `AsyncWrite` that checks that what it is given is `pattern` repeated, and counts it.
/// Compares slices (memcmp), so it keeps up with a flood even in a debug build under TCG.
pub struct Pattern {
    pub pattern: &'static [u8],
    pub len: u64,
    pub mismatch_at: Option<u64>,
}

impl Pattern {
    pub fn new(pattern: &'static [u8]) -> Pattern {
        Pattern {
            pattern,
            len: 0,
            mismatch_at: None,
        }
    }
}

impl AsyncWrite for Pattern {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut rest = buf;
        while !rest.is_empty() {
            let off = (this.len % this.pattern.len() as u64) as usize;
            let want = &this.pattern[off..];
            let n = want.len().min(rest.len());
            if this.mismatch_at.is_none() && rest[..n] != want[..n] {
                this.mismatch_at = Some(this.len);
            }
            this.len += n as u64;
            rest = &rest[n..];
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub use vmlink_lab::testing::payload;

pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// An exec request for `argv`.
pub fn cmd(argv: &[&str]) -> vmlink_agent::ExecRequest {
    vmlink_agent::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// No stdin.
pub const NO_STDIN: Option<tokio::io::Empty> = None;

/// Runs `req`, which the agent must refuse to start with an error of `kind`; returns the
/// agent's message.
pub async fn exec_error(
    client: &vmlink_agent::client::Client,
    req: vmlink_agent::ExecRequest,
    kind: vmlink_proto::agent::ErrorKind,
) -> String {
    let what = format!("{:?}", req.argv);
    match client
        .exec(req, NO_STDIN, tokio::io::sink(), tokio::io::sink())
        .await
    {
        Err(vmlink_agent::client::ClientError::Agent {
            kind: k, message, ..
        }) if k == kind => message,
        other => panic!("{what}: expected an agent error of kind {kind}, got {other:?}"),
    }
}

/// Whether process `pid` is gone (or a zombie, which has released everything).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

/// Waits until every process of `pids` is gone, for at most `within`; panics with `what`
/// otherwise. (Polling /proc: there is no event for another process's death that works for
/// non-children across all kernels here.)
pub async fn await_gone(pids: &[u32], within: std::time::Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    while !pids.iter().all(|&p| process_gone(p)) {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
