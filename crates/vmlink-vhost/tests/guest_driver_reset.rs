//! A guest resets its vsock device the way a reboot does, without rebooting (the lab's QEMU runs
//! with `-no-reboot`): the stock Linux driver is unbound from the device through sysfs and bound
//! again, within one vhost-user session. The connections of the old driver end on the host side
//! and leave the backend's counters; new connections work both ways.
//!
//! The guest cannot use vsock while its driver is unbound, so the host and the guest pace each
//! other over a virtio-serial port.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use vmlink_transport::{Addr, Listener, Stream};

const CID: u64 = 12;
const TEST: &str = "driver_unbind_and_bind_frees_the_old_connections";
/// Bytes each way on each connection.
const LEN: usize = 256 << 10;
/// Bytes the host writes into each old connection while the driver is unbound.
const PROBE: usize = 4096;
/// The virtio-serial port the host and the guest pace each other on.
const PORT: &str = "vmlink.reset";
/// The stock Linux vsock driver in sysfs.
const DRIVER: &str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

/// Guest to host: `LEN` bytes of `seed`, then the host's digest of them back. The connection
/// stays open.
fn guest_send(c: &mut Stream, seed: u64) {
    let data = common::payload(seed, LEN);
    c.write_all(&data).expect("write to the host");
    let mut digest = [0u8; 32];
    c.read_exact(&mut digest).expect("read the host's digest");
    assert_eq!(
        digest[..],
        common::sha(&data)[..],
        "host digest, seed {seed}"
    );
}

/// The receiving side of either direction: `LEN` bytes of `seed`, checked, then their digest
/// back (`way` names the direction in a failure). The connection stays open.
fn receive_and_answer(s: &mut (impl Read + Write), seed: u64, way: &str) {
    let mut all = vec![0u8; LEN];
    s.read_exact(&mut all).expect("read the payload");
    assert!(
        all == common::payload(seed, LEN),
        "{way} bytes, seed {seed}"
    );
    s.write_all(&common::sha(&all))
        .expect("answer with the digest");
}

/// The vsock device's name (`virtioN`) while the driver is bound to it.
fn vsock_device() -> String {
    let names: Vec<String> = std::fs::read_dir(DRIVER)
        .expect("the vsock driver is loaded")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("virtio"))
        .collect();
    assert_eq!(names.len(), 1, "one device bound to the driver: {names:?}");
    names[0].clone()
}

fn driver_ctl(what: &str, device: &str) {
    std::fs::write(format!("{DRIVER}/{what}"), device)
        .unwrap_or_else(|e| panic!("{what} {device}: {e}"));
}

/// An old connection after the driver went away: the guest kernel reset it (no data, no wait).
/// Returns what a read gives.
fn assert_reset(who: &str, s: &mut Stream) -> String {
    s.set_nonblocking(true).expect("non-blocking");
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => "end-of-file".into(),
        Ok(n) => panic!("{who}: {n} bytes after the driver was unbound"),
        Err(e) => {
            assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "{who}: still connected after the driver was unbound"
            );
            e.to_string()
        }
    }
}

/// Guest side: a connection each way, checked; unbind the driver (both connections open), tell
/// the host, wait for its word, bind it again; a new connection each way, checked.
fn guest_side() {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/virtio-ports/{PORT}"))
        .expect("open the pacing port");
    let mut lines = BufReader::new(port.try_clone().expect("clone the port"));

    let l = Listener::bind(&addr("vsock-listen:2000")).expect("listen on 2000");
    let mut c = Stream::connect(&addr("vsock:2:1000")).expect("connect to host port 1000");
    guest_send(&mut c, 1);
    let mut s = l.accept().expect("accept the host's connection");
    receive_and_answer(&mut s, 2, "host->guest");

    let device = vsock_device();
    driver_ctl("unbind", &device);
    assert!(
        std::fs::read_dir(DRIVER)
            .expect("driver dir")
            .filter_map(|e| e.ok())
            .all(|e| e.file_name() != device.as_str()),
        "{device} is unbound"
    );
    println!(
        "measured: in the guest after the unbind, a read on the old connections gives: {}; {}",
        assert_reset("guest->host connection", &mut c),
        assert_reset("host->guest connection", &mut s)
    );
    drop((c, s));
    port.write_all(b"unbound\n").expect("tell the host");
    let mut word = String::new();
    lines.read_line(&mut word).expect("read the host's word");
    assert_eq!(word, "bind\n");
    driver_ctl("bind", &device);
    assert_eq!(vsock_device(), device, "the driver is bound again");

    let l = Listener::bind(&addr("vsock-listen:2001")).expect("listen on 2001");
    let mut c = Stream::connect(&addr("vsock:2:1000")).expect("connect to host port 1000 again");
    guest_send(&mut c, 3);
    let mut s = l.accept().expect("accept the host's second connection");
    receive_and_answer(&mut s, 4, "host->guest");
    // Both new connections stay open until the host has read the counters.
    let mut word = String::new();
    lines
        .read_line(&mut word)
        .expect("read the host's last word");
    assert_eq!(word, "done\n");
}

/// Host side of what the guest receives ([`receive_and_answer`]), on a connection to guest port `port`.
fn host_send(uds: &Path, port: u32, seed: u64) -> UnixStream {
    let mut c = UnixStream::connect(uds).expect("connect to uds-path");
    c.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("write CONNECT");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = c.read(&mut byte).expect("read the OK line");
        assert_eq!(n, 1, "EOF before the OK line: {line:?}");
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    let data = common::payload(seed, LEN);
    c.write_all(&data).expect("write to the guest");
    let mut digest = [0u8; 32];
    c.read_exact(&mut digest).expect("read the guest's digest");
    assert_eq!(
        digest[..],
        common::sha(&data)[..],
        "guest digest, seed {seed}"
    );
    c
}

/// Whether an old connection's host end is still open: nothing to read, no end-of-file.
fn host_end_open(s: &UnixStream) -> bool {
    s.set_nonblocking(true).expect("non-blocking");
    let mut b = [0u8; 16];
    let open = match (&*s).read(&mut b) {
        Ok(0) => false,
        Ok(n) => panic!("{n} bytes on an old connection"),
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).expect("blocking");
    open
}

/// An old connection's host end ends: end-of-file, or a reset where the backend left bytes
/// unread. Fails if it stays open for 30 s, or if bytes come.
fn assert_host_end_ends(who: &str, s: &UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut b = [0u8; 16];
    match (&*s).read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{who}: {n} bytes on an old connection"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{who}: the old connection's host end is still open after the rebind"
        ),
    }
}

/// The VM's open connections and counters from the stats socket.
fn stats(path: &Path) -> (u64, serde_json::Value) {
    let doc = common::print_stats(path);
    let vm = &doc["vms"][0];
    assert_eq!(vm["guest_cid"], CID);
    (
        vm["open_connections"].as_u64().expect("open_connections"),
        vm["counters"].clone(),
    )
}

#[test]
fn driver_unbind_and_bind_frees_the_old_connections() {
    if vmlink_lab::in_guest() {
        guest_side();
        return;
    }
    let _watchdog = common::watchdog(TEST, Duration::from_secs(420));
    let dir = common::test_dir("driver-reset");
    let stats_path = dir.join("stats.sock");
    let mut backend = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(&dir, CID, ""),
            "--stats-socket".into(),
            stats_path.display().to_string(),
        ],
        1,
    );
    let uds = common::uds_path(&dir, CID);
    let l1000 =
        UnixListener::bind(dir.join(format!("vsock-{CID}_1000"))).expect("bind host port 1000");
    let serial = dir.join("pace.sock");
    let mut cfg = common::lab(&common::vhost_socket(&dir, CID));
    cfg.serials.push((PORT.into(), serial.clone()));
    let exe: std::ffi::OsString = std::env::current_exe().expect("test binary").into();
    let argv = [
        exe,
        TEST.into(),
        "--exact".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    let guest = vmlink_lab::spawn(&cfg, &argv, vmlink_lab::GuestIo::Capture).expect("boot");
    let mut pace = UnixStream::connect(&serial).expect("connect to the pacing port");
    let mut lines = BufReader::new(pace.try_clone().expect("clone"));

    // The old driver's connections, one each way, open.
    let (mut old_g2h, _) = l1000.accept().expect("guest connects to host port 1000");
    receive_and_answer(&mut old_g2h, 1, "guest->host");
    let old_h2g = host_send(&uds, 2000, 2);
    let (open, _) = stats(&stats_path);
    assert_eq!(open, 2, "both connections open");

    // The driver is unbound. QEMU stops the rings (SET_VRING_ENABLE 0, GET_VRING_BASE) as it
    // does when the VM is only paused: the backend cannot tell the two apart and keeps the
    // connections, with what the host writes into them meanwhile.
    let mut word = String::new();
    lines.read_line(&mut word).expect("read the guest's word");
    if word.is_empty() {
        // The port closed: the guest side failed (or timed out) before it unbound.
        let out = guest.wait().expect("the guest ends");
        panic!(
            "the guest ended before it unbound its driver (status {})\n--- guest stdout\n{}\n--- guest stderr\n{}",
            out.code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(word, "unbound\n", "the guest unbound its driver");
    let (open, _) = stats(&stats_path);
    assert_eq!(open, 2, "a stopped device keeps its connections");
    for (who, s) in [("guest->host", &old_g2h), ("host->guest", &old_h2g)] {
        assert!(host_end_open(s), "{who}: open while the device is stopped");
        (&*s)
            .write_all(&common::payload(5, PROBE))
            .expect("write into an old connection");
    }

    // The driver is bound again: its rings start at index 0, and the backend frees the old
    // driver's connections before it takes the new driver's first packet.
    pace.write_all(b"bind\n").expect("tell the guest to bind");
    let line = backend.wait_log("connections of its previous boot");
    assert!(line.contains("freed 2 connections"), "{line}");
    assert_host_end_ends("guest->host", &old_g2h);
    assert_host_end_ends("host->guest", &old_h2g);

    // New connections both ways; nothing of the old ones reached the new driver.
    let (mut new_g2h, _) = l1000
        .accept()
        .expect("guest connects to host port 1000 again");
    receive_and_answer(&mut new_g2h, 3, "guest->host");
    let new_h2g = host_send(&uds, 2001, 4);
    let (open, counters) = stats(&stats_path);
    println!("measured: after the rebind: open_connections={open} counters={counters}");
    assert_eq!(open, 2, "only the two new connections are open");
    assert_eq!(counters["connections_opened"], 4);
    assert_eq!(counters["connections_closed"], 2, "the old two are closed");
    let want = 2 * LEN as u64 + 2 * 32;
    assert_eq!(
        counters["rx_bytes"], want,
        "to the guest: two payloads and two digests, not the bytes written while unbound"
    );
    assert_eq!(counters["tx_bytes"], want, "from the guest");
    pace.write_all(b"done\n")
        .expect("tell the guest we are done");
    drop((new_h2g, new_g2h, old_g2h, old_h2g));

    let out = guest.wait().expect("the guest ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.code, 0,
        "guest side failed\n--- guest stdout\n{stdout}\n--- guest stderr\n{stderr}"
    );
    assert!(stdout.contains("1 passed"), "guest ran no test:\n{stdout}");
    for line in stdout.lines() {
        if let Some(at) = line.find("measured:") {
            println!("guest {}", &line[at..]);
        }
    }
    assert!(backend.alive(), "the backend outlives the reset");
}
