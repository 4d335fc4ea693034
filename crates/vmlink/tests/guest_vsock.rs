//! AF_VSOCK through the real Linux vsock core and its loopback transport,
//! inside lab guests (never on the host: see the README).

mod common;

use vmlink_lab::guest_test;

use std::io::{Read, Write};

use vmlink_transport::{local_cid, Addr, Endpoint, Error, Listener, Stream};

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

fn bound_port(l: &Listener) -> u32 {
    match l.local_addr().endpoint {
        Endpoint::VsockListen { port, .. } => port.0,
        ref e => panic!("not a vsock listener: {e:?}"),
    }
}

guest_test! {
    fn vsock_stream_reports_assigned_port_and_carries_a_half_close() cfg { common::vsock_lab() } {
        assert_eq!(local_cid().expect("local CID"), 1, "only the loopback transport is loaded");
        let l = Listener::bind(&addr("vsock-listen:local:any")).expect("bind PORT_ANY");
        let port = bound_port(&l);
        assert_ne!(port, u32::MAX, "the kernel's port is reported, not `any`");
        assert!(l.local_addr().to_string().starts_with("vsock-listen:local:"));
        let server = std::thread::spawn(move || {
            let mut s = l.accept().expect("accept");
            let (cid, _) = s.vsock_peer().expect("peer address");
            assert_eq!(cid, 1);
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read to EOF");
            // Only after the client's EOF: proves the other direction is still open.
            s.write_all(&common::sha(&all)).expect("answer after EOF");
        });
        let data = common::payload(1, 4 << 20);
        let mut c = Stream::connect(&addr(&format!("vsock:local:{port},buffer-size=1M"))).expect("connect");
        assert_eq!(c.vsock_buffer_size().expect("buffer size"), 1 << 20);
        c.write_all(&data).expect("write");
        c.shutdown_write().expect("half-close");
        let mut digest = Vec::new();
        c.read_to_end(&mut digest).expect("read answer");
        assert_eq!(digest, common::sha(&data));
        server.join().expect("server");
    }
}

guest_test! {
    fn vsock_seqpacket_keeps_record_boundaries() cfg { common::vsock_lab() } {
        let l = Listener::bind(&addr("vsock-seqpacket-listen:any")).expect("bind");
        let port = bound_port(&l);
        let sizes = [1usize, 10, 1000, 65536, 3];
        let server = std::thread::spawn(move || {
            let mut s = l.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            let mut got = Vec::new();
            loop {
                let n = s.read(&mut buf).expect("read record");
                if n == 0 {
                    break;
                }
                got.push(n);
                s.write_all(&buf[..n]).expect("echo record");
            }
            got
        });
        let mut c = Stream::connect(&addr(&format!("vsock-seqpacket:1:{port}"))).expect("connect");
        let mut buf = vec![0u8; 1 << 20];
        for (i, &n) in sizes.iter().enumerate() {
            let rec = common::payload(i as u64, n);
            c.write_all(&rec).expect("send record");
            // One read returns exactly one record.
            let k = c.read(&mut buf).expect("read echo");
            assert_eq!(k, n, "record {i}");
            assert_eq!(&buf[..k], &rec[..]);
        }
        c.shutdown_write().expect("half-close");
        assert_eq!(server.join().expect("server"), sizes.to_vec());
    }
}

guest_test! {
    fn vsock_errors_say_what_is_wrong() cfg { common::vsock_lab() } {
        // No transport here has datagrams: the error says so, not "ENODEV".
        let e = Stream::connect(&addr("vsock-dgram:1:7")).expect_err("no dgram transport");
        assert!(matches!(e, Error::DgramUnsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("no loaded vsock transport supports datagrams"), "{e}");

        // Nothing listens: refused, naming the address.
        let l = Listener::bind(&addr("vsock-listen:any")).expect("bind");
        let port = bound_port(&l);
        drop(l);
        let e = Stream::connect(&addr(&format!("vsock:1:{port}"))).expect_err("refused");
        assert!(matches!(e, Error::Refused { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("connection to vsock:local:{port} refused: nothing listens on that vsock port")
        );

        // A port already taken.
        let l = Listener::bind(&addr("vsock-listen:any")).expect("bind");
        let port = bound_port(&l);
        let e = Listener::bind(&addr(&format!("vsock-listen:{port}"))).expect_err("in use");
        let msg = vmlink_transport::error_chain(&e);
        assert!(msg.starts_with(&format!("cannot listen on vsock-listen:{port}: ")), "{msg}");

        // The CLI turns the same into a one-line error and status 1. (Not
        // port + 1: the next ephemeral port is likely the client's own.)
        let out = common::vmlink()
            .args(["bench", "run", "vsock:local:9"])
            .output()
            .expect("run vmlink");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("refused"), "{err}");
    }
}
