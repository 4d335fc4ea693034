//! `vmlink relay` as a user runs it, inside lab guests: from vsock to Unix
//! sockets, with real socat as a peer, half-close, 200 concurrent
//! connections, and a misbehaving peer that must not hurt the others.

mod common;

use vmlink_lab::guest_test;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmlink_transport::{Addr, Stream};

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

/// A Unix echo server: each connection is echoed until EOF, then closed
/// (after a half-close of its own).
fn unix_echo_server(path: &str) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).expect("bind echo server");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    })
}

/// Writes `data` to `s` from another thread while reading the echo here.
fn echo_round_trip(mut s: Stream, data: Vec<u8>) -> Vec<u8> {
    let fd = writer_handle(&s);
    let writer = std::thread::spawn(move || {
        let mut fd = fd;
        fd.write_all(&data).expect("write");
        fd.shutdown(std::net::Shutdown::Write).ok();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read echo");
    writer.join().expect("writer");
    back
}

/// A second handle on the same socket, for writing from another thread.
fn writer_handle(s: &Stream) -> std::os::unix::net::UnixStream {
    use std::os::fd::AsFd;
    // A vsock socket is still a socket: UnixStream's write and shutdown are
    // plain write(2)/shutdown(2) on the descriptor.
    std::os::unix::net::UnixStream::from(s.as_fd().try_clone_to_owned().expect("dup"))
}

guest_test! {
    fn relay_works_with_socat_on_both_sides() cfg { common::vsock_lab() } {
        // socat is the echo server behind the relay, and the client in front of it.
        let sock = "/tmp/socat-echo.sock";
        let mut echo = Command::new("socat")
            .args([&format!("UNIX-LISTEN:{sock},fork"), "EXEC:cat"])
            .spawn()
            .expect("socat (apt-get install socat)");
        // socat creates the socket file when it listens: wait for that event.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(sock).exists() {
            assert!(std::time::Instant::now() < deadline, "socat never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        let relay = common::start_relay(&["vsock-listen:any", &format!("unix:{sock}")]);
        let port = common::vsock_port(&relay.listen);
        let data = common::payload(3, 2 << 20);
        let mut client = Command::new("socat")
            .args(["-t", "5", "-", &format!("VSOCK-CONNECT:1:{port}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("socat client");
        let mut stdin = client.stdin.take().expect("stdin");
        let d2 = data.clone();
        let w = std::thread::spawn(move || stdin.write_all(&d2).expect("feed socat"));
        let out = client.wait_with_output().expect("socat client output");
        w.join().expect("writer");
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), data.len());
        assert_eq!(common::sha(&out.stdout), common::sha(&data));
        let _ = echo.kill();
        let _ = echo.wait();
    }
}

guest_test! {
    fn relay_passes_half_close_through() cfg { common::vsock_lab() } {
        // The backend answers only after EOF: the digest of what it got.
        let path = "/tmp/sha.sock";
        let l = UnixListener::bind(path).expect("bind");
        let backend = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read to EOF");
            s.write_all(&common::sha(&all)).expect("answer");
        });
        let relay = common::start_relay(&["vsock-listen:any", &format!("unix:{path}")]);
        let port = common::vsock_port(&relay.listen);
        let mut c = Stream::connect(&addr(&format!("vsock:1:{port}"))).expect("connect");
        let data = common::payload(9, 1 << 20);
        c.write_all(&data).expect("write");
        c.shutdown_write().expect("half-close");
        let mut digest = Vec::new();
        c.read_to_end(&mut digest).expect("read answer");
        assert_eq!(digest, common::sha(&data));
        backend.join().expect("backend");
    }
}

guest_test! {
    fn relay_serves_200_concurrent_connections_intact() cfg { common::vsock_lab() } {
        let path = "/tmp/echo200.sock";
        let _echo = unix_echo_server(path);
        let relay = common::start_relay(&["vsock-listen:any", &format!("unix:{path}")]);
        let port = common::vsock_port(&relay.listen);
        let clients: Vec<_> = (0..200u64)
            .map(|i| {
                let a = addr(&format!("vsock:1:{port}"));
                std::thread::spawn(move || {
                    let data = common::payload(i, 64 * 1024 + i as usize);
                    let s = Stream::connect(&a).unwrap_or_else(|e| panic!("client {i}: {e}"));
                    let back = echo_round_trip(s, data.clone());
                    assert_eq!(common::sha(&back), common::sha(&data), "client {i}");
                })
            })
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            c.join().unwrap_or_else(|_| panic!("client {i} failed"));
        }
    }
}

guest_test! {
    fn relay_keeps_serving_while_one_peer_stalls_and_a_target_is_down() cfg { common::vsock_lab() } {
        let path = "/tmp/echo-stall.sock";
        let _echo = unix_echo_server(path);
        let relay = common::start_relay(&["vsock-listen:any", &format!("unix:{path}")]);
        let port = common::vsock_port(&relay.listen);
        let a = addr(&format!("vsock:1:{port}"));
        // A peer that sends 8 MiB and never reads its echo: its connection
        // backs up through the relay and the echo server.
        let mut staller = Stream::connect(&a).expect("staller connects");
        let stall_writer = {
            let mut w = writer_handle(&staller);
            std::thread::spawn(move || {
                let chunk = vec![7u8; 1 << 16];
                for _ in 0..128 {
                    if w.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        // Everyone else still gets through, one after another.
        for i in 0..20u64 {
            let data = common::payload(100 + i, 100_000);
            let s = Stream::connect(&a).expect("connect while a peer stalls");
            assert_eq!(common::sha(&echo_round_trip(s, data.clone())), common::sha(&data), "client {i}");
        }
        // A relay whose target is down drops that connection and goes on.
        let dead = common::start_relay(&["vsock-listen:any", "unix:/tmp/nobody-here.sock"]);
        let dport = common::vsock_port(&dead.listen);
        for _ in 0..3 {
            let mut s = Stream::connect(&addr(&format!("vsock:1:{dport}"))).expect("accepted");
            let mut b = Vec::new();
            // The relay closes it: EOF (or a reset), never a hang.
            let _ = s.read_to_end(&mut b);
            assert!(b.is_empty());
        }
        let l = UnixListener::bind("/tmp/nobody-here.sock").expect("target comes up");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.write_all(b"up").expect("write");
        });
        let mut s = Stream::connect(&addr(&format!("vsock:1:{dport}"))).expect("connect");
        let mut b = Vec::new();
        s.read_to_end(&mut b).expect("read");
        assert_eq!(b, b"up");
        t.join().expect("target");
        // The staller finally reads: its relay connection was alive all
        // along, and all 8 MiB come back.
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while got < 128 << 16 {
            let n = staller.read(&mut buf).expect("staller reads its echo");
            assert!(n > 0, "EOF after {got} bytes");
            assert!(buf[..n].iter().all(|&b| b == 7));
            got += n;
        }
        stall_writer.join().expect("stall writer");
    }
}
