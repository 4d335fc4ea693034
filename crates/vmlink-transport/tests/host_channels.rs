//! Channels that need no guest: Unix (path and abstract), TCP on loopback,
//! hybrid vsock against a VMM-side fixture, stdio-free relays, and the
//! errors for refused, missing and timed-out peers. The vsock and
//! virtio-serial channels are tested in real guests (tests/guest_*.rs).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_proto::hybrid::{ConnectReply, ConnectRequest, Handshake};
use vmlink_transport::relay::{self, RelayOptions};
use vmlink_transport::{Addr, AsyncListener, AsyncStream, Error, Listener, Stream};

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

/// A fresh directory for socket files, removed at the end of the test.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmlink-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

use vmlink_lab::testing::payload;

/// Serves one connection on `l`: reads to EOF, then writes back the SHA-256
/// of what it read and closes. Proves half-close: the answer can only come
/// after the peer's EOF arrived while the other direction stayed open.
fn sha_server_once(l: Listener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = l.accept().expect("accept");
        let mut all = Vec::new();
        s.read_to_end(&mut all).expect("read to EOF");
        s.write_all(&Sha256::digest(&all)).expect("write digest");
    })
}

#[test]
fn unix_path_stream_half_closes_and_keeps_reading() {
    let d = TempDir::new("unix");
    let a = addr(&format!("unix-listen:{}", d.path("s").display()));
    let l = Listener::bind(&a).expect("bind");
    let server = sha_server_once(l);
    let mut c =
        Stream::connect(&addr(&format!("unix:{}", d.path("s").display()))).expect("connect");
    let data = payload(1, 3 << 20);
    c.write_all(&data).expect("write");
    c.shutdown_write().expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("read digest");
    assert_eq!(digest, Sha256::digest(&data).to_vec());
    server.join().expect("server thread");
}

#[test]
fn unix_listener_removes_its_socket_file_when_dropped() {
    let d = TempDir::new("unlink");
    let p = d.path("s");
    let l = Listener::bind(&addr(&format!("unix-listen:{}", p.display()))).expect("bind");
    assert!(p.exists());
    drop(l);
    assert!(!p.exists());
    // A stale socket file is an error without `unlink` and replaced with it.
    let stale = UnixListener::bind(&p).expect("stale socket");
    std::mem::forget(stale);
    let e = Listener::bind(&addr(&format!("unix-listen:{}", p.display()))).expect_err("in use");
    assert!(
        e.to_string().contains("cannot listen on unix-listen:"),
        "{e}"
    );
    Listener::bind(&addr(&format!("unix-listen:{},unlink", p.display())))
        .expect("bind with unlink");
}

#[test]
fn abstract_unix_sockets_connect_without_a_file() {
    let name = format!("vmlink-test-{}", std::process::id());
    let l = Listener::bind(&addr(&format!("unix-abstract-listen:{name}"))).expect("bind");
    let server = sha_server_once(l);
    let mut c = Stream::connect(&addr(&format!("unix-abstract:{name}"))).expect("connect");
    c.write_all(b"abstract").expect("write");
    c.shutdown_write().expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("read");
    assert_eq!(digest, Sha256::digest(b"abstract").to_vec());
    server.join().expect("server");
}

#[test]
fn tcp_listen_on_port_zero_reports_the_port_it_got() {
    let l = Listener::bind(&addr("tcp-listen:127.0.0.1:0")).expect("bind");
    let bound = l.local_addr().clone();
    let port = match bound.endpoint {
        vmlink_transport::Endpoint::TcpListen { port, .. } => port,
        ref other => panic!("unexpected {other:?}"),
    };
    assert_ne!(port, 0);
    let server = sha_server_once(l);
    let mut c = Stream::connect(&addr(&format!("tcp:127.0.0.1:{port}"))).expect("connect");
    c.write_all(b"tcp").expect("write");
    c.shutdown_write().expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("read");
    assert_eq!(digest, Sha256::digest(b"tcp").to_vec());
    server.join().expect("server");
}

#[test]
fn refused_and_missing_peers_are_one_line_errors_naming_the_address() {
    let d = TempDir::new("refused");
    let e = Stream::connect(&addr(&format!("unix:{}", d.path("nobody").display())))
        .expect_err("no file");
    let msg = vmlink_transport::error_chain(&e);
    assert!(
        msg.contains("cannot connect to unix:") && msg.contains("No such file"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    // A socket file with no listener behind it: refused.
    let p = d.path("dead");
    drop(UnixListener::bind(&p).expect("bind"));
    let e = Stream::connect(&addr(&format!("unix:{}", p.display()))).expect_err("refused");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");

    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    let e = Stream::connect(&addr(&format!("tcp:127.0.0.1:{port}"))).expect_err("refused");
    assert!(e.to_string().contains("refused"), "{e}");

    let e = Stream::connect(&addr("vsock-listen:5")).expect_err("wrong direction");
    assert!(e.to_string().contains("listening address"), "{e}");
}

/// A VMM's side of hybrid vsock, as Firecracker does it: accept on the Unix
/// socket, read `CONNECT <port>\n` (in whatever pieces it comes), then
/// answer `OK <n>\n` and relay to a backend. Here the "guest" is a Unix
/// echo server keyed by port.
fn fake_vmm(
    uds: PathBuf,
    reply_port: u32,
    first_data: &'static [u8],
) -> std::thread::JoinHandle<u32> {
    let l = UnixListener::bind(&uds).expect("bind vmm socket");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut hs: Handshake<ConnectRequest> =
            Handshake::new(Instant::now(), Duration::from_secs(5));
        let mut b = [0u8; 7];
        let req = loop {
            let n = s.read(&mut b).expect("read");
            if let Some(r) = hs.push(&b[..n]).expect("valid CONNECT") {
                break r;
            }
        };
        // The reply and the first data bytes in one write: the client must
        // keep what follows the `\n`.
        let mut out = ConnectReply { port: reply_port }.encode();
        out.extend_from_slice(first_data);
        s.write_all(&out).expect("reply");
        let mut rest = hs.take_leftover();
        s.read_to_end(&mut rest).expect("read data");
        s.write_all(&Sha256::digest(&rest)).expect("digest");
        req.port
    })
}

#[test]
fn hvsock_connect_sends_connect_line_and_keeps_bytes_after_ok() {
    let d = TempDir::new("hvsock");
    let uds = d.path("v.sock");
    let vmm = fake_vmm(uds.clone(), 1073741824, b"early");
    let mut c =
        Stream::connect(&addr(&format!("hvsock:{}:5201", uds.display()))).expect("hvsock connect");
    let mut early = [0u8; 5];
    c.read_exact(&mut early).expect("early bytes");
    assert_eq!(&early, b"early");
    c.write_all(b"payload").expect("write");
    c.shutdown_write().expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("digest");
    assert_eq!(digest, Sha256::digest(b"payload").to_vec());
    assert_eq!(vmm.join().expect("vmm"), 5201);
}

#[test]
fn hvsock_handshake_times_out_on_a_silent_vmm() {
    let d = TempDir::new("hvsilent");
    let uds = d.path("v.sock");
    let l = UnixListener::bind(&uds).expect("bind");
    let t = Instant::now();
    let e = Stream::connect(&addr(&format!(
        "hvsock:{}:1,connect-timeout=300ms",
        uds.display()
    )))
    .expect_err("silent VMM");
    assert!(t.elapsed() < Duration::from_secs(3));
    let msg = vmlink_transport::error_chain(&e);
    assert!(
        msg.starts_with("hybrid vsock handshake with hvsock:"),
        "{msg}"
    );
    drop(l);
}

#[test]
fn hvsock_vmm_closing_without_reply_reads_as_refused() {
    let d = TempDir::new("hvclose");
    let uds = d.path("v.sock");
    let l = UnixListener::bind(&uds).expect("bind");
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    });
    let e = Stream::connect(&addr(&format!("hvsock:{}:9", uds.display()))).expect_err("closed");
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    t.join().expect("vmm thread");
}

#[test]
fn hvsock_garbage_reply_is_a_handshake_error() {
    let d = TempDir::new("hvbad");
    let uds = d.path("v.sock");
    let l = UnixListener::bind(&uds).expect("bind");
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.write_all(b"NOPE\n").expect("write");
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    });
    let e = Stream::connect(&addr(&format!("hvsock:{}:9", uds.display()))).expect_err("garbage");
    assert!(matches!(e, Error::Handshake { .. }), "{e:?}");
    t.join().expect("vmm thread");
}

#[test]
fn hvsock_listen_binds_uds_path_underscore_port() {
    let d = TempDir::new("hvlisten");
    let uds = d.path("v.sock");
    let l = Listener::bind(&addr(&format!("hvsock-listen:{}:1234", uds.display()))).expect("bind");
    let expect = d.path("v.sock_1234");
    assert!(expect.exists(), "{} missing", expect.display());
    let server = sha_server_once(l);
    // The VMM connects to the listener directly, with no handshake line.
    let mut c = UnixStream::connect(&expect).expect("connect");
    c.write_all(b"from guest").expect("write");
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).expect("read");
    assert_eq!(digest, Sha256::digest(b"from guest").to_vec());
    server.join().expect("server");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The relay engine over Unix sockets, with and without splice: bytes
/// arrive intact and a half-close crosses the relay.
#[test]
fn relay_carries_half_close_both_with_and_without_splice() {
    for splice in [true, false] {
        let d = TempDir::new(if splice { "rsplice" } else { "rcopy" });
        let backend = d.path("backend");
        let front = d.path("front");
        let server = sha_server_once(
            Listener::bind(&addr(&format!("unix-listen:{}", backend.display()))).expect("bind"),
        );
        let front_addr = addr(&format!("unix-listen:{}", front.display()));
        let target = addr(&format!("unix:{}", backend.display()));
        let rt = rt();
        let data = payload(7, 8 << 20);
        let got = rt.block_on(async {
            let l = AsyncListener::bind(&front_addr).expect("bind front");
            let opts = RelayOptions {
                splice,
                ..RelayOptions::default()
            };
            let relay_task = tokio::spawn(async move {
                let a = l.accept().await.expect("accept");
                let b = AsyncStream::connect(&target)
                    .await
                    .expect("connect backend");
                relay::relay(a, b, &opts).await.expect("relay")
            });
            let mut c = AsyncStream::connect(&addr(&format!("unix:{}", front.display())))
                .await
                .expect("connect");
            c.write_all(&data).await.expect("write");
            c.shutdown().await.expect("half-close");
            let mut digest = Vec::new();
            c.read_to_end(&mut digest).await.expect("read");
            let stats = relay_task.await.expect("relay task");
            assert_eq!(stats.forward, data.len() as u64);
            assert_eq!(stats.backward, 32);
            digest
        });
        assert_eq!(got, Sha256::digest(&data).to_vec(), "splice={splice}");
        server.join().expect("server");
    }
}
