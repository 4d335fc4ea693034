//! Fixtures for the vmlink-vhost integration tests: a backend process, and guests attached to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sha2::{Digest, Sha256};

#[allow(unused_imports)]
pub use vmlink_lab::testing::payload;

pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// A fresh directory for one test's sockets (host side, never on a 9p share).
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-vhost-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Every backend process started by this test binary, for the watchdog.
static BACKENDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// A running `vmlink-vhost`, killed on drop. Its log lines arrive on `log`.
pub struct Backend {
    pub child: Child,
    pub log: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Backend {
    /// Starts `vmlink-vhost ARGS...` and waits until every one of its `vms` VMs waits for its VMM.
    pub fn start(args: &[String], vms: usize) -> Backend {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmlink-vhost"))
            .args(args)
            .env("RUST_LOG", "info,vmlink_vhost=debug")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmlink-vhost");
        BACKENDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("backend: {line}");
                if tx.send(line).is_err() {
                    // Keep draining so that the backend never blocks on a full pipe.
                }
            }
        });
        let mut b = Backend {
            child,
            log: rx,
            seen: Vec::new(),
        };
        for _ in 0..vms {
            b.wait_log("waiting for the VMM");
        }
        b
    }

    /// Waits (up to 60 s) for a log line containing `needle`, and returns it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "backend never logged {needle:?} ({e}); saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether the backend is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--vm` for CID `cid` with its sockets in `dir`: `dir/vhost-CID.sock` and `dir/vsock-CID`.
pub fn vm_arg(dir: &Path, cid: u64, extra: &str) -> String {
    format!(
        "guest-cid={cid},socket={},uds-path={}{extra}",
        vhost_socket(dir, cid).display(),
        uds_path(dir, cid).display()
    )
}

pub fn vhost_socket(dir: &Path, cid: u64) -> PathBuf {
    dir.join(format!("vhost-{cid}.sock"))
}

pub fn uds_path(dir: &Path, cid: u64) -> PathBuf {
    dir.join(format!("vsock-{cid}"))
}

/// The stats socket's document, read with `vmlink-vhost --print-stats PATH`.
pub fn print_stats(path: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink-vhost"))
        .arg("--print-stats")
        .arg(path)
        .output()
        .expect("run vmlink-vhost --print-stats");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    serde_json::from_str(&text).expect("the stats document is JSON")
}

/// A lab config whose guest gets `vhost-user-vsock-pci` on `socket`.
pub fn lab(socket: &Path) -> vmlink_lab::LabConfig {
    vmlink_lab::LabConfig {
        vhost_user_vsock: Some(socket.to_path_buf()),
        timeout: Some(vmlink_lab::testing::GUEST_TIMEOUT),
        ..vmlink_lab::LabConfig::default()
    }
}

/// A `SOCK_SEQPACKET` Unix listener (std's `UnixListener` accepts any socket type; reads and
/// writes on the accepted `UnixStream` are then one message each).
pub fn listen_seqpacket(path: &Path) -> std::os::unix::net::UnixListener {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("seqpacket socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).expect("addr"),
    )
    .expect("bind");
    listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
    std::os::unix::net::UnixListener::from(fd)
}

/// A connected `SOCK_SEQPACKET` Unix socket.
pub fn connect_seqpacket(path: &Path) -> std::os::unix::net::UnixStream {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("seqpacket socket");
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(path).expect("addr"),
    )
    .expect("connect");
    std::os::unix::net::UnixStream::from(fd)
}

/// Ends the test process if the test is still running after `limit`: a host side blocked in
/// `accept` or `read` (a guest that never boots, a stalled connection) fails in minutes, never
/// hangs CI. Dropping the guard disarms it.
pub struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{name}: still running after {limit:?}: failing the test");
            // Exiting skips destructors: kill the backends this test started first.
            for pid in BACKENDS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let pid = nix::unistd::Pid::from_raw(*pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            std::process::exit(101);
        }
    });
    Watchdog(tx)
}
