//! A guest killed mid-transfer frees its state (its host connections end) and the next guest on
//! the same vhost-user socket is served; a restarted backend (stale socket files left behind)
//! serves again.

mod common;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use vmlink_transport::{Addr, Stream};

const CID: u64 = 10;
const TEST: &str = "killed_guest_frees_state_and_restarted_backend_serves";

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

fn guest_side() {
    match std::env::var("VHOST_ROLE").as_deref() {
        Ok("flood") => {
            let mut c = Stream::connect(&addr("vsock:2:1000")).expect("connect to 1000");
            let chunk = common::payload(3, 64 * 1024);
            // Until the host kills this guest.
            loop {
                c.write_all(&chunk).expect("write");
            }
        }
        Ok("check") => {
            let mut c = Stream::connect(&addr("vsock:2:1001")).expect("connect to 1001");
            c.write_all(b"hi").expect("write");
            c.shutdown_write().expect("half-close");
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).expect("read");
            assert_eq!(answer, b"ok");
        }
        other => panic!("unknown VHOST_ROLE {other:?}"),
    }
}

fn check_round(l1001: &UnixListener, cfg: vmlink_lab::LabConfig) {
    let guest = std::thread::spawn(move || vmlink_lab::testing::run_self_in_guest(cfg, TEST));
    let (mut s, _) = l1001.accept().expect("guest connects to 1001");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read");
    assert_eq!(got, b"hi");
    s.write_all(b"ok").expect("answer");
    drop(s);
    guest.join().expect("check guest passed");
}

#[test]
fn killed_guest_frees_state_and_restarted_backend_serves() {
    if vmlink_lab::in_guest() {
        guest_side();
        return;
    }
    let _watchdog = common::watchdog(
        "killed_guest_frees_state_and_restarted_backend_serves",
        std::time::Duration::from_secs(420),
    );
    let dir = common::test_dir("restart");
    let args = vec!["--vm".to_string(), common::vm_arg(&dir, CID, "")];
    let mut backend = common::Backend::start(&args, 1);
    let l1000 = UnixListener::bind(dir.join(format!("vsock-{CID}_1000"))).expect("bind");
    let l1001 = UnixListener::bind(dir.join(format!("vsock-{CID}_1001"))).expect("bind");
    let cfg = |role: &str| {
        let mut c = common::lab(&common::vhost_socket(&dir, CID));
        c.mem = "512M".into();
        c.env.push(("VHOST_ROLE".into(), role.into()));
        c
    };

    // A guest flooding host port 1000, killed mid-transfer.
    let exe: OsString = std::env::current_exe().expect("test binary").into();
    let argv: Vec<OsString> = vec![exe, TEST.into(), "--exact".into(), "--nocapture".into()];
    let mut flood = vmlink_lab::spawn(&cfg("flood"), &argv, vmlink_lab::GuestIo::Capture)
        .expect("boot the flooding guest");
    let (mut s, _) = l1000.accept().expect("flooding guest connects");
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).expect("1 MiB arrives");
    assert_eq!(&buf[..64 * 1024], &common::payload(3, 64 * 1024)[..]);
    flood.kill();
    let out = flood.wait().expect("guest ends");
    assert_ne!(out.code, 0, "the flooding guest was killed");
    backend.wait_log("VMM disconnected");
    // The VM's connection is freed: the host side ends (EOF or reset), it does not hang.
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("host connection still open after the VM went away")
            }
            Err(_) => break "reset",
        }
    };
    assert!(end == "eof" || end == "reset");
    backend.wait_log("waiting for the VMM");

    // The next QEMU on the same socket is served.
    check_round(&l1001, cfg("check"));
    assert!(backend.alive());

    // The backend restarted on the same paths: stale socket files do not stop it.
    drop(backend);
    let _backend = common::Backend::start(&args, 1);
    check_round(&l1001, cfg("check"));
}
