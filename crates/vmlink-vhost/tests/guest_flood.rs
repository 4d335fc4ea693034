//! Two guests on one vmlink-vhost process: guest A floods (connects to refused ports, fills its
//! connection bound with connections that push data to a host listener that never reads, then a
//! connection storm against the full bound) while guest B moves a checked payload both ways.
//! B's transfer must complete, and A's counters must show that the bounds held. B's throughput
//! with and without the flood is printed, never asserted (the machine is shared and TCG is slow).

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmlink_transport::{Addr, Error, Stream};

const TEST: &str = "a_flooding_guest_does_not_stop_another_guests_transfer";
const CID_A: u64 = 3;
const CID_B: u64 = 4;
/// A's connection bound (its `max-connections`).
const MAX_CONNS: usize = 48;
/// A's per-connection buffer toward the host (its `tx-buffer-size`).
const TX_BUF: usize = 64 * 1024;
/// Connections A tries to hold: more than its bound.
const FLOOD_CONNS: usize = MAX_CONNS + 16;
/// Connections A makes to host ports where nothing listens.
const REFUSED: usize = 64;
/// B's payload, each way, each round.
const LEN: usize = 4 << 20;
/// B's rounds: a warm-up (TCG translates the code paths the first time), alone, during the flood.
const ROUNDS: u64 = 3;

fn addr(s: &str) -> Addr {
    s.parse().expect("test address parses")
}

fn read_byte(s: &mut Stream) -> u8 {
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("read a control byte");
    b[0]
}

/// Guest A (CID 3): on the host's go, floods in three ways and reports on its control connection
/// (host port 1000): refused ports, the connection bound with data nobody reads, then a storm of
/// connections against the full bound until the host says stop.
fn guest_flooder() {
    let mut ctl = Stream::connect(&addr("vsock:2:1000")).expect("connect to host port 1000");
    assert_eq!(read_byte(&mut ctl), b'g');

    for i in 0..REFUSED {
        let port = 7000 + i;
        match Stream::connect(&addr(&format!("vsock:2:{port}"))) {
            Err(Error::Refused { .. }) => {}
            other => panic!("host port {port} has no listener, got {other:?}"),
        }
    }

    // Up to the bound (the control connection is one of them), then RST.
    let mut held = Vec::new();
    let mut limited = 0;
    for _ in 0..FLOOD_CONNS {
        match Stream::connect(&addr("vsock:2:6000")) {
            Ok(s) => {
                s.set_nonblocking(true).expect("non-blocking");
                held.push(s);
            }
            Err(Error::Refused { .. }) => limited += 1,
            Err(e) => panic!("connect to host port 6000: {e:?}"),
        }
    }
    // Push into every held connection until the credit the device gives stops it.
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut pushed = 0usize;
    for s in &mut held {
        let mut idle = 0;
        while idle < 3 {
            match s.write(&chunk) {
                Ok(n) => {
                    pushed += n;
                    idle = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Credit updates may still be on their way: look again a little later.
                    idle += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("write to a held connection: {e}"),
            }
        }
    }
    writeln!(ctl, "{} {limited} {pushed}", held.len()).expect("report");

    // Connection storm against the full bound, until the host says stop.
    ctl.set_nonblocking(true).expect("non-blocking control");
    let mut storm = 0usize;
    let mut b = [0u8; 1];
    loop {
        match ctl.read(&mut b) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("control connection: {e}"),
        }
        match Stream::connect(&addr("vsock:2:6000")) {
            Err(Error::Refused { .. }) => storm += 1,
            other => panic!("the bound is full: expected RST, got {other:?}"),
        }
    }
    ctl.set_nonblocking(false).expect("blocking control");
    writeln!(ctl, "{storm}").expect("report the storm");
    drop(held);
}

/// Guest B (CID 4): for each round, says ready on its control connection (host port 1001), and on
/// the host's go sends a payload to host port 2000, half-closes, checks the host's digest and the payload that follows it.
fn guest_transfer() {
    let mut ctl = Stream::connect(&addr("vsock:2:1001")).expect("connect to host port 1001");
    for round in 0..ROUNDS {
        // Both payloads are made before the go: the host times only the transfer.
        let data = common::payload(10 + round, LEN);
        let expected = common::payload(20 + round, LEN);
        ctl.write_all(b"r").expect("say ready");
        assert_eq!(read_byte(&mut ctl), b'g');
        let mut c = Stream::connect(&addr("vsock:2:2000")).expect("connect to host port 2000");
        c.write_all(&data).expect("write to host");
        c.shutdown_write().expect("half-close");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read the host's answer");
        assert_eq!(back.len(), 32 + LEN, "digest and payload from the host");
        assert_eq!(
            back[..32],
            common::sha(&data)[..],
            "host digest, round {round}"
        );
        assert!(
            back[32..] == expected[..],
            "host->guest payload, round {round}"
        );
        ctl.write_all(b"k").expect("say done");
    }
}

/// One round of B's transfer, timed from the host's go (once B is ready) to B's done: returns MiB/s (both ways).
fn transfer_round(ctl: &mut UnixStream, l2000: &UnixListener, round: u64) -> f64 {
    let expected = common::payload(10 + round, LEN);
    let answer = common::payload(20 + round, LEN);
    let mut b = [0u8; 1];
    ctl.read_exact(&mut b).expect("B is ready");
    assert_eq!(b[0], b'r');
    let t0 = Instant::now();
    ctl.write_all(b"g").expect("go to B");
    let (mut s, _) = l2000.accept().expect("B connects to host port 2000");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read B's payload");
    assert!(all == expected, "B->host payload, round {round}");
    s.write_all(&common::sha(&all)).expect("digest");
    s.write_all(&answer).expect("payload to B");
    drop(s);
    ctl.read_exact(&mut b).expect("B's done");
    assert_eq!(b[0], b'k');
    (2 * LEN) as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64()
}

/// Unread bytes in a Unix stream socket's receive queue.
fn unread(s: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points to `n`.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

fn read_line(r: &mut BufReader<UnixStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read a report line");
    line.trim().to_owned()
}

#[test]
fn a_flooding_guest_does_not_stop_another_guests_transfer() {
    if vmlink_lab::in_guest() {
        match std::env::var("VHOST_ROLE").as_deref() {
            Ok("flooder") => guest_flooder(),
            Ok("transfer") => guest_transfer(),
            other => panic!("unknown VHOST_ROLE {other:?}"),
        }
        return;
    }
    let _watchdog = common::watchdog(TEST, Duration::from_secs(420));
    let dir = common::test_dir("flood");
    let mut backend = common::Backend::start(
        &[
            "--vm".into(),
            common::vm_arg(
                &dir,
                CID_A,
                &format!(",tx-buffer-size={TX_BUF},max-connections={MAX_CONNS}"),
            ),
            "--vm".into(),
            common::vm_arg(&dir, CID_B, ""),
        ],
        2,
    );
    let l_actl = UnixListener::bind(dir.join(format!("vsock-{CID_A}_1000"))).expect("bind");
    let l_sink = UnixListener::bind(dir.join(format!("vsock-{CID_A}_6000"))).expect("bind");
    let l_bctl = UnixListener::bind(dir.join(format!("vsock-{CID_B}_1001"))).expect("bind");
    let l2000 = UnixListener::bind(dir.join(format!("vsock-{CID_B}_2000"))).expect("bind");

    // The host end of A's held connections: accepted, never read.
    let sink: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let sink2 = sink.clone();
    std::thread::spawn(move || {
        for s in l_sink.incoming() {
            match s {
                Ok(s) => sink2.lock().expect("sink").push(s),
                Err(e) => panic!("accept on host port 6000: {e}"),
            }
        }
    });

    let guest = |cid: u64, role: &str| {
        let mut cfg = common::lab(&common::vhost_socket(&dir, cid));
        cfg.mem = "512M".into();
        cfg.env.push(("VHOST_ROLE".into(), role.into()));
        std::thread::spawn(move || vmlink_lab::testing::run_self_in_guest(cfg, TEST))
    };
    let ga = guest(CID_A, "flooder");
    let gb = guest(CID_B, "transfer");
    let (mut actl, _) = l_actl.accept().expect("A connects to host port 1000");
    let mut areport = BufReader::new(actl.try_clone().expect("clone"));
    let (mut bctl, _) = l_bctl.accept().expect("B connects to host port 1001");

    transfer_round(&mut bctl, &l2000, 0);
    let quiet = transfer_round(&mut bctl, &l2000, 1);

    actl.write_all(b"g").expect("go to A");
    let report = read_line(&mut areport);
    let nums: Vec<usize> = report
        .split(' ')
        .map(|n| n.parse().expect("a number"))
        .collect();
    let (held, limited, pushed) = (nums[0], nums[1], nums[2]);
    // The control connection is one of A's connections: A holds the rest of its bound.
    assert_eq!(held, MAX_CONNS - 1, "A's connections up to its bound");
    assert_eq!(
        limited,
        FLOOD_CONNS - held,
        "A's connections past its bound get RST"
    );

    let flooded = transfer_round(&mut bctl, &l2000, 2);

    actl.write_all(b"s").expect("stop A");
    let storm: usize = read_line(&mut areport).parse().expect("storm count");
    ga.join().expect("guest A's test passed");
    gb.join().expect("guest B's test passed");

    // What A pushed is either in the host sockets (never read) or buffered by the device, and
    // the device buffers at most its tx-buffer-size per connection: the credit held.
    let in_host: usize = sink.lock().expect("sink").iter().map(unread).sum();
    assert!(in_host > 0, "A's data reached the host sockets");
    assert!(
        pushed.saturating_sub(in_host) <= held * TX_BUF,
        "A pushed {pushed} bytes, {in_host} are in the host sockets: the device buffers more than \
         {held} x {TX_BUF}"
    );

    let pid = nix::unistd::Pid::from_raw(backend.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    let counters = |backend: &mut common::Backend, cid: u64| loop {
        let l = backend.wait_log("counters:");
        if l.contains(&format!("cid={cid}")) {
            break l;
        }
    };
    let a = counters(&mut backend, CID_A);
    let count = |line: &str, name: &str| -> usize {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map_or(0, |v| v.parse().expect("a counter value"))
    };
    assert!(
        count(&a, "refused") >= REFUSED,
        "refused ports counted: {a}"
    );
    assert!(
        count(&a, "connection_limit") >= limited + storm,
        "every connection past the bound counted: {a}"
    );
    assert_eq!(count(&a, "credit_violations"), 0, "{a}");
    assert!(backend.alive(), "the backend survives the flood");
    println!(
        "measured: guest B both ways {quiet:.1} MiB/s alone, {flooded:.1} MiB/s while guest A \
         flooded ({REFUSED} refused, {held} held with {pushed} bytes pushed, {limited} + {storm} \
         connections past its bound of {MAX_CONNS})"
    );
}
