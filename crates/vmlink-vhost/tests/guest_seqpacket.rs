//! Seqpacket through vmlink-vhost with a real guest: message boundaries kept both ways, guest to
//! host (`<uds-path>_<port>` is a `SOCK_SEQPACKET` listener) and host to guest (through
//! `<uds-path>_seqpacket`, the `CONNECT` line and its reply one message each).

mod common;

use std::io::{Read, Write};

use vmlink_transport::{Addr, Listener, Stream};

const CID: u64 = 9;
// 250 000: over the 212 960 bytes that a default AF_UNIX send buffer takes in one message, within
// the default 256 KiB credit (the host socket's send buffer is raised to fit).
const SIZES: [usize; 7] = [1, 10, 1000, 65536, 3, 200_000, 250_000];

/// This test's own host sockets send the largest record back in one message: their send buffer
/// must hold it (a default AF_UNIX one takes 212 960 bytes).
fn big_messages(s: &impl std::os::fd::AsFd) {
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &(1 << 20))
        .expect("SO_SNDBUF");
}

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

fn guest_side() {
    let l = Listener::bind(&addr("vsock-seqpacket-listen:2100")).expect("listen on 2100");
    let mut c = Stream::connect(&addr("vsock-seqpacket:2:1100")).expect("connect to host 1100");
    let mut buf = vec![0u8; 1 << 20];
    for (i, &n) in SIZES.iter().enumerate() {
        let rec = common::payload(i as u64, n);
        c.write_all(&rec).expect("send record");
        let k = c.read(&mut buf).expect("read echo");
        assert_eq!(k, n, "echo of record {i} is one whole message");
        assert_eq!(&buf[..k], &rec[..], "record {i}");
    }
    c.shutdown_write().expect("half-close");
    assert_eq!(
        c.read(&mut buf).expect("EOF"),
        0,
        "host closes after our SHUT_WR"
    );

    let mut s = l.accept().expect("accept the host's seqpacket connection");
    let mut count = 0;
    loop {
        let n = s.read(&mut buf).expect("read record");
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).expect("echo");
        count += 1;
    }
    assert_eq!(count, SIZES.len(), "one read per host message");
}

#[test]
fn seqpacket_both_ways_keeps_message_boundaries() {
    if vmlink_lab::in_guest() {
        guest_side();
        return;
    }
    let _watchdog = common::watchdog(
        "seqpacket_both_ways_keeps_message_boundaries",
        std::time::Duration::from_secs(420),
    );
    let dir = common::test_dir("seqpacket");
    let mut backend = common::Backend::start(&["--vm".into(), common::vm_arg(&dir, CID, "")], 1);
    let l1100 = common::listen_seqpacket(&dir.join(format!("vsock-{CID}_1100")));
    let cfg = common::lab(&common::vhost_socket(&dir, CID));
    let guest = std::thread::spawn(move || {
        vmlink_lab::testing::run_self_in_guest(cfg, "seqpacket_both_ways_keeps_message_boundaries")
    });

    let (mut s, _) = l1100.accept().expect("guest connects to host port 1100");
    big_messages(&s);
    let mut buf = vec![0u8; 1 << 20];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).expect("read message");
        if n == 0 {
            break;
        }
        got.push(n);
        s.write_all(&buf[..n]).expect("echo");
    }
    assert_eq!(got, SIZES.to_vec(), "one host message per guest record");
    drop(s);

    let mut c = common::connect_seqpacket(&dir.join(format!("vsock-{CID}_seqpacket")));
    big_messages(&c);
    c.write_all(b"CONNECT 2100\n").expect("CONNECT message");
    let n = c.read(&mut buf).expect("OK message");
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(line.starts_with("OK ") && line.ends_with('\n'), "{line:?}");
    for (i, &n) in SIZES.iter().enumerate() {
        let rec = common::payload(100 + i as u64, n);
        c.write_all(&rec).expect("send");
        let k = c.read(&mut buf).expect("echo");
        assert_eq!(k, n, "echo of host record {i} is one message");
        assert_eq!(&buf[..k], &rec[..]);
    }
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_eq!(c.read(&mut buf).expect("EOF"), 0);

    guest.join().expect("guest test passed");
    assert!(backend.alive());
}
