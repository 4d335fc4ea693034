//! Fixtures shared by the integration tests. Guest tests use
//! `vmlink_lab::guest_test!` (see `vmlink_lab::testing`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};

#[allow(unused_imports)]
pub use vmlink_lab::testing::{payload, vsock_lab};

pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// The `vmlink` binary under test.
pub fn vmlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
}

/// Runs `vmlink ARGS` to its end, stdin empty; its output.
pub fn run_vmlink(args: &[&str]) -> std::process::Output {
    vmlink()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink")
}

/// A running `vmlink serial-bridge CTL [DATA] --listen SOCK`, killed on drop.
pub struct Bridge(pub Child);

impl Bridge {
    /// Starts the bridge (without a data port when `data` is `None`); `quiet` sends its log
    /// to /dev/null.
    pub fn start(
        ctl: &std::path::Path,
        data: Option<&std::path::Path>,
        listen: &std::path::Path,
        quiet: bool,
    ) -> Bridge {
        let mut cmd = vmlink();
        cmd.arg("serial-bridge")
            .arg(ctl)
            .args(data)
            .arg("--listen")
            .arg(listen)
            .stdin(Stdio::null());
        if quiet {
            cmd.stderr(Stdio::null());
        }
        Bridge(cmd.spawn().expect("start vmlink serial-bridge"))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `vmlink relay`, killed on drop.
pub struct Relay {
    pub child: Child,
    /// The listening address as the relay reported it (port filled in).
    pub listen: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vmlink relay ARGS...` and waits for its "relaying X -> Y" line,
/// which it prints once it is listening.
pub fn start_relay(args: &[&str]) -> Relay {
    let mut child = vmlink()
        .arg("relay")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink relay");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let line = lines
        .next()
        .expect("relay printed nothing")
        .expect("read relay stderr");
    let listen = line
        .strip_prefix("vmlink: relaying ")
        .and_then(|r| r.split(" -> ").next())
        .unwrap_or_else(|| panic!("unexpected relay output: {line}"))
        .to_string();
    // Keep draining stderr so the relay never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Relay { child, listen }
}

/// The vsock port of a `vsock-listen:...:PORT` address.
pub fn vsock_port(listen: &str) -> u32 {
    listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listen}"))
}

/// A new pseudo-terminal of `rows` x `cols`: (master, slave).
#[allow(dead_code)]
pub fn openpty(rows: u16, cols: u16) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors through valid pointers and reads the window size;
    // no name buffer, no termios.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here alone.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Reads the pty master until `want` appears, within `within` (poll, no blind sleeps).
#[allow(dead_code)]
pub fn read_master_until(master: i32, seen: &mut Vec<u8>, within: std::time::Duration, want: &str) {
    use std::time::Instant;
    let deadline = Instant::now() + within;
    while !String::from_utf8_lossy(seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {want:?}; got {:?}",
            String::from_utf8_lossy(seen)
        );
        let mut p = libc::pollfd {
            fd: master,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd through the pointer, valid for the call.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if r <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: read writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(
            n > 0,
            "the terminal closed; got {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&buf[..n as usize]);
    }
}
