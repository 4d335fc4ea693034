//! Stream connections through vmlink-vhost with a real guest (QEMU `vhost-user-vsock-pci`, the
//! stock Linux driver): both directions with checked multi-MiB payloads, a `CONNECT` line split
//! over several writes, half-close both ways, and refused ports in both directions.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vmlink_transport::{Addr, Error, Listener, Stream};

const CID: u64 = 5;
const LEN: usize = 4 << 20;

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

/// Guest side: listen on 2000, send a payload to host port 1000 and half-close, read the host's
/// digest; accept the host's connection on 2000, read to EOF, answer with the digest after the
/// host's half-close; finally, connecting to host port 1002 (nothing there) is refused.
fn guest_side() {
    let l = Listener::bind(&addr("vsock-listen:2000")).expect("listen on 2000");

    let data = common::payload(1, LEN);
    let mut c = Stream::connect(&addr("vsock:2:1000")).expect("connect to host port 1000");
    c.write_all(&data).expect("write to host");
    c.shutdown_write().expect("half-close toward host");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest)
        .expect("read the host's answer after our SHUT_WR");
    assert_eq!(
        digest,
        common::sha(&data),
        "host digest of guest->host payload"
    );
    drop(c);

    let mut s = l.accept().expect("accept the host's connection");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read host payload to EOF");
    assert_eq!(all.len(), LEN, "host->guest length");
    assert_eq!(all, common::payload(2, LEN), "host->guest bytes");
    s.write_all(&common::sha(&all))
        .expect("answer after the host's SHUT_WR");
    drop(s);

    let e = Stream::connect(&addr("vsock:2:1002")).expect_err("nothing listens on host port 1002");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
}

#[test]
fn stream_both_ways_split_connect_half_close_and_refusals() {
    if vmlink_lab::in_guest() {
        guest_side();
        return;
    }
    let _watchdog = common::watchdog(
        "stream_both_ways_split_connect_half_close_and_refusals",
        std::time::Duration::from_secs(420),
    );
    let dir = common::test_dir("stream");
    let pcap = dir.join("cap.pcap");
    let mut backend = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(&dir, CID, ""),
            "--pcap".into(),
            pcap.display().to_string(),
        ],
        1,
    );
    let uds = common::uds_path(&dir, CID);
    let l1000 =
        UnixListener::bind(dir.join(format!("vsock-{CID}_1000"))).expect("bind host port 1000");

    let cfg = common::lab(&common::vhost_socket(&dir, CID));
    let guest = std::thread::spawn(move || {
        vmlink_lab::testing::run_self_in_guest(
            cfg,
            "stream_both_ways_split_connect_half_close_and_refusals",
        )
    });

    // Guest to host, with the guest's half-close.
    let (mut s, _) = l1000.accept().expect("guest connects to host port 1000");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read guest payload to EOF");
    assert_eq!(all.len(), LEN);
    assert_eq!(all, common::payload(1, LEN), "guest->host bytes");
    s.write_all(&common::sha(&all))
        .expect("answer after the guest's SHUT_WR");
    drop(s);

    // Host to guest: the CONNECT line in three writes, with pauses so they arrive as separate
    // reads (the outcome must not depend on that either way).
    let mut c = UnixStream::connect(&uds).expect("connect to uds-path");
    for part in [&b"CONN"[..], b"ECT 20", b"00\n"] {
        c.write_all(part).expect("write part of CONNECT");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = c.read(&mut byte).expect("read OK line");
        assert_eq!(n, 1, "EOF before the OK line: {line:?}");
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).expect("ASCII");
    assert!(line.starts_with("OK ") && line.len() > 4, "{line:?}");
    let data = common::payload(2, LEN);
    c.write_all(&data).expect("write to guest");
    c.shutdown(std::net::Shutdown::Write)
        .expect("half-close toward guest");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest)
        .expect("read the guest's answer after our SHUT_WR");
    assert_eq!(
        digest,
        common::sha(&data),
        "guest digest of host->guest payload"
    );

    // Host to a guest port where nothing listens: closed without a reply.
    let mut c = UnixStream::connect(&uds).expect("connect to uds-path");
    c.write_all(b"CONNECT 2001\n").expect("write CONNECT");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("read to EOF");
    assert!(
        rest.is_empty(),
        "a refused connection gets no reply, got {rest:?}"
    );

    guest.join().expect("guest test passed");
    assert!(backend.alive(), "the backend outlives its guest");

    // The capture, switched off while running (which flushes it), reads back with tshark.
    let pid = nix::unistd::Pid::from_raw(backend.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2).expect("SIGUSR2");
    backend.wait_log("packet capture off");
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "vsock.virtio.op",
            "-e",
            "vsock.virtio.dst_prot",
        ])
        .output()
        .expect("run tshark (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("1\t")).collect();
    for port in ["1000", "2000", "2001", "1002"] {
        assert!(
            requests.iter().any(|l| l.ends_with(&format!("\t{port}"))),
            "a request to port {port} is in the capture: {requests:?}"
        );
    }
    let rw = text.lines().filter(|l| l.starts_with("5\t")).count();
    assert!(rw > 100, "{rw} data packets captured");
}
