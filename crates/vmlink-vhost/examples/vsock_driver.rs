//! Benchmarks a vhost-user-vsock backend without QEMU or a guest: this process is the VMM
//! (vhost-user frontend, memfd guest memory) and the guest's virtio-vsock driver (modelled on
//! Linux 6.1), so what is measured is the backend's own cost, as a fast (KVM) guest would
//! expose it. See docs/benchmarks.md, "With a native driver instead of a TCG guest".
//!
//! ```sh
//! vmlink-vhost --vm guest-cid=3,socket=/tmp/v.sock,uds-path=/tmp/v.vsock &
//! cargo run --release -p vmlink-vhost --example vsock_driver -- \
//!     --socket /tmp/v.sock --uds-path /tmp/v.vsock --bytes 256M --backend-pid $!
//! ```
//!
//! Never opens an AF_VSOCK socket.

#[allow(dead_code)]
mod native_driver;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use native_driver::driver::{Driver, Stats};
use native_driver::machine::{Machine, QUEUE_SIZE};
use native_driver::workload::{Bench, RoundTrips, Throughput, Unclean};

/// The guest CID this driver plays.
const GUEST_CID: u64 = 3;

#[derive(Parser, Debug)]
#[command(about = "A native virtio-vsock driver that benchmarks a vhost-user-vsock backend")]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// The backend's hybrid vsock socket (`uds-path`).
    #[arg(long)]
    uds_path: PathBuf,
    /// Bytes each way, and in total over the concurrent connections (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    bytes: u64,
    /// 1-byte round trips.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Concurrent host -> guest connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Pause between two round trips, microseconds (sparse traffic: what polling costs).
    #[arg(long, default_value_t = 0)]
    gap_us: u64,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (Linux does when offered).
    #[arg(long)]
    no_event_idx: bool,
    /// The backend's PID, for its CPU time per workload (`/proc/PID/stat`).
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Bound on each workload, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 64K, 256M)"))
}

#[derive(Serialize)]
struct Report {
    queue_size: u16,
    event_idx: bool,
    upload: Throughput,
    download: Throughput,
    round_trips: RoundTrips,
    concurrent_connections: usize,
    concurrent: Throughput,
    unclean: Vec<Unclean>,
    closes: std::collections::BTreeMap<String, u64>,
    driver: Stats,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.conns == 0 || a.round_trips == 0 {
        bail!("--conns and --round-trips must be at least 1");
    }
    let m = Machine::connect(&a.socket, !a.no_event_idx)?;
    if m.guest_cid != 0 && m.guest_cid != GUEST_CID {
        bail!(
            "the backend serves guest CID {}, this driver plays CID {GUEST_CID}",
            m.guest_cid
        );
    }
    let driver = Driver::new(m, GUEST_CID).context("start the driver")?;
    let mut b = Bench {
        driver,
        uds: a.uds_path.clone(),
        backend_pid: a.backend_pid,
        timeout: Duration::from_secs(a.timeout),
        unclean: Vec::new(),
        closes: Default::default(),
    };
    let upload = b.upload(a.bytes).context("upload")?;
    let download = b.download(a.bytes).context("download")?;
    let round_trips = b
        .round_trips_spaced(a.round_trips, Duration::from_micros(a.gap_us))
        .context("round trips")?;
    let concurrent = b.concurrent(a.conns, a.bytes).context("concurrent")?;
    let r = Report {
        queue_size: QUEUE_SIZE,
        event_idx: b.driver.event_idx(),
        upload,
        download,
        round_trips,
        concurrent_connections: a.conns,
        concurrent,
        unclean: b.unclean,
        closes: b.closes,
        driver: b.driver.stats.clone(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let cpu = |c: Option<f64>| c.map_or(String::new(), |c| format!(", backend CPU {c:.3} s"));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "native virtio-vsock driver, queue size {}, EVENT_IDX {}",
        r.queue_size,
        if r.event_idx { "on" } else { "off" }
    );
    println!(
        "upload (guest -> host)   {:8.1} MiB/s  ({:.0} MiB in {:.3} s{})",
        r.upload.mib_s,
        mib(r.upload.bytes),
        r.upload.secs,
        cpu(r.upload.backend_cpu_s)
    );
    println!(
        "download (host -> guest) {:8.1} MiB/s  ({:.0} MiB in {:.3} s{})",
        r.download.mib_s,
        mib(r.download.bytes),
        r.download.secs,
        cpu(r.download.backend_cpu_s)
    );
    println!(
        "1-byte round trip        median {:.1} us, p99 {:.1} us, mean {:.1} us ({} round trips{})",
        r.round_trips.median_us,
        r.round_trips.p99_us,
        r.round_trips.mean_us,
        r.round_trips.round_trips,
        cpu(r.round_trips.backend_cpu_s)
    );
    println!(
        "{} connections           {:8.1} MiB/s  ({:.0} MiB in {:.3} s{})",
        r.concurrent_connections,
        r.concurrent.mib_s,
        mib(r.concurrent.bytes),
        r.concurrent.secs,
        cpu(r.concurrent.backend_cpu_s)
    );
    for u in &r.unclean {
        println!(
            "NOT CLEAN: {} connection {} -> {}: {:?} after {} bytes sent, {} received",
            u.workload, u.local_port, u.peer_port, u.close, u.sent, u.received
        );
    }
    println!("connection ends: {:?}", r.closes);
    println!("driver: {:?}", r.driver);
    Ok(())
}
