//! Two guests on one vmlink-vhost process: VM-to-VM within a group, refused across groups, and
//! the per-VM counters read while running (SIGUSR1, and the stats socket).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use vmlink_transport::{Addr, Error, Listener, Stream};

const LEN: usize = 2 << 20;
const TEST: &str = "two_vms_talk_within_a_group_and_not_across";

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

/// CID 7: listens on 3000, tells the host it is ready, then serves one connection from CID 6.
fn guest_listener() {
    let l = Listener::bind(&addr("vsock-listen:3000")).expect("listen on 3000");
    let mut ready = Stream::connect(&addr("vsock:2:1000")).expect("connect to host port 1000");
    ready.write_all(b"ready").expect("say ready");
    drop(ready);
    let mut s = l.accept().expect("accept from CID 6");
    assert_eq!(s.vsock_peer().expect("peer").0, 6, "the peer is CID 6");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read to EOF");
    assert_eq!(all, common::payload(6, LEN), "bytes from CID 6");
    s.write_all(&common::sha(&all))
        .expect("answer after SHUT_WR");
}

/// CID 6: waits for the host's go, sends a payload to CID 7, then tries CID 8 (other group).
fn guest_connector() {
    let mut go = Stream::connect(&addr("vsock:2:1001")).expect("connect to host port 1001");
    let mut b = [0u8; 1];
    go.read_exact(&mut b).expect("wait for go");
    let data = common::payload(6, LEN);
    let mut c = Stream::connect(&addr("vsock:7:3000")).expect("connect to CID 7");
    c.write_all(&data).expect("write");
    c.shutdown_write().expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("read answer");
    assert_eq!(digest, common::sha(&data));
    let e = Stream::connect(&addr("vsock:8:3000")).expect_err("CID 8 shares no group");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
}

#[test]
fn two_vms_talk_within_a_group_and_not_across() {
    if vmlink_lab::in_guest() {
        match std::env::var("VHOST_ROLE").as_deref() {
            Ok("listener") => guest_listener(),
            Ok("connector") => guest_connector(),
            other => panic!("unknown VHOST_ROLE {other:?}"),
        }
        return;
    }
    let _watchdog = common::watchdog(
        "two_vms_talk_within_a_group_and_not_across",
        std::time::Duration::from_secs(420),
    );
    let dir = common::test_dir("v2v");
    let mut backend = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(&dir, 6, ",groups=a"),
            "--vm".into(),
            common::vm_arg(&dir, 7, ",groups=b+a"),
            "--vm".into(),
            common::vm_arg(&dir, 8, ",groups=b"),
            "--stats-socket".into(),
            dir.join("stats.sock").display().to_string(),
        ],
        3,
    );
    let l1000 = UnixListener::bind(dir.join("vsock-7_1000")).expect("bind");
    let l1001 = UnixListener::bind(dir.join("vsock-6_1001")).expect("bind");
    let guest = |cid: u64, role: &str| {
        let mut cfg = common::lab(&common::vhost_socket(&dir, cid));
        cfg.mem = "512M".into();
        cfg.env.push(("VHOST_ROLE".into(), role.into()));
        std::thread::spawn(move || vmlink_lab::testing::run_self_in_guest(cfg, TEST))
    };
    let g7 = guest(7, "listener");
    let g6 = guest(6, "connector");
    let (mut ready, _) = l1000.accept().expect("CID 7 connects");
    let mut word = Vec::new();
    ready.read_to_end(&mut word).expect("read ready");
    assert_eq!(word, b"ready");
    let (mut go, _) = l1001.accept().expect("CID 6 connects");
    go.write_all(b"g").expect("go");
    g7.join().expect("CID 7's guest test passed");
    g6.join().expect("CID 6's guest test passed");

    // Counters while running: CID 6 forwarded packets and had one unroutable request.
    let pid = nix::unistd::Pid::from_raw(backend.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    let line = loop {
        let l = backend.wait_log("counters:");
        if l.contains("cid=6") {
            break l;
        }
    };
    assert!(line.contains(" forwarded="), "{line}");
    assert!(line.contains("unroutable=1"), "{line}");
    assert!(
        !line.contains("spoofed_cid"),
        "no spoofing from a stock kernel: {line}"
    );

    // The same through the stats socket. Both QEMUs have exited: once their devices are
    // dropped, no connection is left open.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let vms = loop {
        let vms = read_stats(&dir.join("stats.sock"));
        if vms.iter().all(|v| v["open_connections"] == 0) {
            break vms;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections still open after both guests exited: {vms:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let counter = |cid: u64, name: &str| -> u64 {
        let vm = vms
            .iter()
            .find(|v| v["guest_cid"] == cid)
            .unwrap_or_else(|| panic!("CID {cid} in {vms:?}"));
        vm["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} of CID {cid} in {vm}"))
    };
    eprintln!(
        "stats socket: CID 6 forwarded={} unroutable={} connections_opened={}, CID 7 forwarded={}",
        counter(6, "forwarded"),
        counter(6, "unroutable"),
        counter(6, "connections_opened"),
        counter(7, "forwarded")
    );
    for cid in [6, 7] {
        assert!(
            counter(cid, "forwarded") > 0,
            "CID {cid} forwarded: {vms:?}"
        );
        assert_eq!(counter(cid, "spoofed_cid"), 0);
        assert!(counter(cid, "connections_opened") >= 1, "{vms:?}");
    }
    assert_eq!(counter(6, "unroutable"), 1, "{vms:?}");
    assert_eq!(counter(8, "tx_packets"), 0, "CID 8 never ran: {vms:?}");
    assert!(backend.alive());
}

/// The `vms` array of the stats socket's document.
fn read_stats(path: &std::path::Path) -> Vec<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect to the stats socket");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text)
        .expect("read the stats document");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the stats document is JSON");
    assert_eq!(doc["capture"], serde_json::Value::Null, "no --pcap: {text}");
    doc["vms"].as_array().cloned().expect("vms")
}
