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
