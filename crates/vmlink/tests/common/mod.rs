//! Fixtures shared by the integration tests.
//!
//! Guest tests use [`guest_test!`]: on the host, the test boots a lab guest
//! that runs this same test binary filtered to this one test; inside the
//! guest (`VMLINK_LAB_GUEST=1`), the body runs against the real kernel.
//! A guest that cannot boot fails the test; nothing is skipped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};
use vmlink_lab::{GuestIo, LabConfig};

/// Defines a test whose body runs inside a lab guest built by `$cfg`.
#[macro_export]
macro_rules! guest_test {
    ($(#[$m:meta])* fn $name:ident() cfg $cfg:block $body:block) => {
        #[test]
        $(#[$m])*
        fn $name() {
            if !vmlink_lab::in_guest() {
                common::run_in_guest($cfg, stringify!($name));
                return;
            }
            $body
        }
    };
}

/// Boots a guest that runs test `name` of the current test binary and
/// asserts that it passed, showing the guest's output when it did not.
pub fn run_in_guest(cfg: LabConfig, name: &str) {
    let exe = std::env::current_exe().expect("current test binary");
    let argv: Vec<std::ffi::OsString> = vec![
        exe.into(),
        name.into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let out = vmlink_lab::run(&cfg, &argv, GuestIo::Capture).expect("the lab guest boots");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.code, 0,
        "guest test {name} failed with status {}\n--- guest stdout\n{stdout}\n--- guest stderr\n{stderr}",
        out.code
    );
    // The harness in the guest must have run exactly this one test.
    assert!(stdout.contains("1 passed"), "guest ran no test:\n{stdout}");
}

/// How long any one guest test may run before the lab stops it (status
/// 124 fails the test): a hang costs minutes, not the whole CI budget.
pub const GUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// A lab config with vsock_loopback loaded.
pub fn vsock_lab() -> LabConfig {
    LabConfig {
        vsock_loopback: true,
        timeout: Some(GUEST_TIMEOUT),
        ..LabConfig::default()
    }
}

/// Reproducible pseudo-random bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

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
