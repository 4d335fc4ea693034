//! The native driver (examples/native_driver: a vhost-user frontend playing Linux's
//! virtio-vsock driver) against the real `vmlink-vhost` binary. Host only: no QEMU, no guest,
//! no AF_VSOCK. Every byte is checked against a pattern in both directions, and every
//! connection must end in a SHUTDOWN/RST exchange.

mod common;

#[allow(dead_code)]
#[path = "../examples/native_driver/mod.rs"]
mod native_driver;

use std::time::Duration;

use common::Backend;
use native_driver::driver::{CloseKind, Driver};
use native_driver::machine::Machine;
use native_driver::workload::Bench;

const CID: u64 = 3;

/// A fresh `vmlink-vhost` with one VM, and the driver attached to it as its VMM and guest.
fn start(name: &str, event_idx: bool) -> (Backend, Bench) {
    start_with(name, event_idx, "", None)
}

/// [`start`] with `extra` appended to the `--vm` spec, and a stats socket when given.
fn start_with(
    name: &str,
    event_idx: bool,
    extra: &str,
    stats: Option<&std::path::Path>,
) -> (Backend, Bench) {
    let dir = common::test_dir(name);
    let mut args = vec!["--vm".to_string(), common::vm_arg(&dir, CID, extra)];
    if let Some(s) = stats {
        args.extend(["--stats-socket".to_string(), s.display().to_string()]);
    }
    let backend = Backend::start(&args, 1);
    let m = Machine::connect(&common::vhost_socket(&dir, CID), event_idx)
        .expect("vhost-user handshake with vmlink-vhost");
    assert_eq!(m.guest_cid, CID, "config space guest CID");
    assert_eq!(m.event_idx, event_idx, "EVENT_IDX negotiated as asked");
    let driver = Driver::new(m, CID).expect("driver start");
    let bench = Bench {
        driver,
        uds: common::uds_path(&dir, CID),
        backend_pid: Some(backend.child.id()),
        timeout: Duration::from_secs(60),
        unclean: Vec::new(),
        closes: Default::default(),
    };
    (backend, bench)
}

fn assert_clean(b: &Bench) {
    assert!(b.unclean.is_empty(), "unclean closes: {:?}", b.unclean);
    let s = &b.driver.stats;
    assert_eq!(
        s.credit_overrun_bytes, 0,
        "device overran the guest's credit"
    );
    assert_eq!(s.unknown_packets, 0, "packets for no connection: {s:?}");
    assert_eq!(s.invalid_op_packets, 0, "packets with op 0: {s:?}");
    assert_eq!(b.driver.open(), 0, "connections left open");
}

/// Upload, download, round trips and 100 concurrent connections, byte-exact.
fn workloads(name: &str, event_idx: bool) {
    let (mut backend, mut b) = start(name, event_idx);
    let mib = 1 << 20;
    let up = b.upload(3 * mib + 5).expect("upload");
    assert_eq!(up.bytes, 3 * mib + 5);
    let down = b.download(3 * mib + 7).expect("download");
    assert_eq!(down.bytes, 3 * mib + 7);
    let rt = b.round_trips(300).expect("round trips");
    assert_eq!(rt.round_trips, 300);
    // 100 connections of 40 KiB + 1 byte each: a few packets apiece, some past one credit
    // update.
    let conc = b
        .concurrent(100, 100 * (40 * 1024 + 1))
        .expect("100 connections");
    assert_eq!(conc.bytes, 100 * (40 * 1024 + 1));
    assert_clean(&b);
    assert!(backend.alive(), "vmlink-vhost exited");
}

#[test]
fn native_driver_moves_checked_bytes_with_event_idx() {
    workloads("native-driver-event-idx", true);
}

#[test]
fn native_driver_moves_checked_bytes_without_event_idx() {
    workloads("native-driver-no-event-idx", false);
}

/// The guest writes and shuts down its sending side; the host reads to end of stream and only
/// then answers; the guest gets the whole answer and the connection ends cleanly.
#[test]
fn native_driver_half_close_still_gets_the_answer() {
    let (mut backend, mut b) = start("native-driver-half-close", true);
    let rep = b
        .half_close(300 * 1024 + 3, 700 * 1024 + 9)
        .expect("half-close");
    assert_eq!(rep.sent, 300 * 1024 + 3);
    assert_eq!(rep.received, 700 * 1024 + 9);
    // The host side finished last: vmlink-vhost sends SHUTDOWN (both flags) and the driver,
    // as Linux does, answers with RST: the spec's clean disconnect, not an RST out of the blue.
    assert_eq!(rep.close, CloseKind::Clean, "{rep:?}");
    assert_clean(&b);
    assert!(backend.alive(), "vmlink-vhost exited");
}

/// `poll-us`: with polling, the VM's thread finds the guest's echo and the host's next byte
/// without being woken (counted in `poll_hits`), and the guest kicks for TX less often (the
/// thread watches the ring meanwhile); with `poll-us=0` it never polls, and the guest kicks
/// for every echo. Both move every byte.
#[test]
fn native_driver_round_trips_with_and_without_polling() {
    let mut kicks = Vec::new();
    for (poll, name) in [
        ("1000", "native-driver-poll"),
        ("0", "native-driver-no-poll"),
    ] {
        let stats = common::test_dir(&format!("{name}-stats")).join("stats.sock");
        let (mut backend, mut b) =
            start_with(name, true, &format!(",poll-us={poll}"), Some(&stats));
        let rt = b.round_trips(300).expect("round trips");
        assert_eq!(rt.round_trips, 300);
        assert_clean(&b);
        let doc = common::print_stats(&stats);
        let hits = doc["vms"][0]["counters"]["poll_hits"]
            .as_u64()
            .unwrap_or_else(|| panic!("no poll_hits counter: {doc}"));
        kicks.push(b.driver.stats.tx_kicks);
        if poll == "0" {
            assert_eq!(hits, 0, "poll-us=0 polled");
            assert!(
                b.driver.stats.tx_kicks >= 300,
                "without polling every echo kicks: {:?}",
                b.driver.stats
            );
        } else {
            assert!(
                hits > 0,
                "poll-us={poll}: nothing found by polling in 300 round trips"
            );
        }
        assert!(backend.alive(), "vmlink-vhost exited");
    }
    println!("measured: guest TX kicks for 300 round trips: {kicks:?} (polling, not)");
    assert!(
        kicks[0] < kicks[1],
        "polling did not spare the guest TX kicks: {kicks:?}"
    );
}
