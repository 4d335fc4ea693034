//! Micro-benchmarks of the vsock device model through the real queue code: `drain_tx` and
//! `fill_rx` on virtio-queue `Queue`s laid out by `MockSplitQueue` in a `GuestMemoryMmap`, the
//! host side on real Unix sockets (as `tests/device_queues.rs` drives it). No guest, no QEMU,
//! no AF_VSOCK: the "guest" below is a driver model in this thread that fills and recycles
//! descriptors and keeps to the credit the device grants.
//!
//! - `tx/<size>`: guest -> host, 256 KiB per iteration in packets of 64 KiB (what Linux sends)
//!   or 4 KiB; the host reads every byte from its socket.
//! - `rx/4KiB-bufs`: host -> guest, 256 KiB per iteration written into the host socket and
//!   delivered into 4 KiB RX buffers (Linux's), which the guest recycles.
//! - `roundtrip_1B`: host writes 1 byte -> RX packet -> guest echoes it in a 1-byte TX packet
//!   -> host reads it: the per-packet cost of both paths with their syscalls.
//!
//! Connection set-up is outside the timed loop; each benchmark first runs one checked iteration
//! (the bytes compared) and every timed iteration asserts the byte count, so a broken path fails
//! instead of measuring nothing. Run: `cargo bench -p vmlink-vhost --bench device`.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmlink_vhost::backend::{drain_tx, fill_rx};
use vmlink_vhost::counters::Counters;
use vmlink_vhost::device::*;

const CID: u64 = 3;
const HDR: u32 = 44;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Descriptors per ring; every packet is a 2-descriptor chain (header, data).
const RING: u16 = 256;
const CHAINS: u16 = RING / 2;
/// The guest's receive buffer per connection (Linux's default, 256 KiB).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Bytes moved per iteration of the throughput benchmarks: one device credit window.
const BATCH: usize = DEFAULT_TX_BUFFER_SIZE as usize;
/// Linux guests post 4 KiB RX buffers.
const RX_BUF: u32 = 4096;

const TX_RING_AT: u64 = 0;
const RX_RING_AT: u64 = 0x8000;
const TX_BUFS: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const RX_BUFS: u64 = 0x100_0000;
const RX_SLOT: u64 = 0x1100;
const MEM_SIZE: usize = 0x200_0000;

/// The driver side of one split virtqueue, on `MockSplitQueue`'s descriptor table and avail
/// ring. Two things of the mock (virtio-queue 0.16) are not used, as they break once a ring
/// goes round: `add_desc_chains` indexes the avail ring without wrapping (here chains are
/// written once and their heads offered round the ring), and its used ring starts inside the
/// avail ring (`SplitQueueRing::end` counts elements as bytes: with 256 entries, avail entries
/// from 128 on overwrite the used ring; rust-vmm/vm-virtio#400), so the queue's used ring is
/// placed after the avail ring here.
struct Vq<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> Vq<'a> {
    fn new(mem: &'a GuestMemoryMmap, at: u64) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(at), RING);
        let mut queue = mock.create_queue::<Queue>().expect("queue");
        // flags, idx, ring[RING], used_event; the used ring is 4-aligned.
        let used = (mock.avail_addr().raw_value() + 4 + 2 * u64::from(RING) + 2 + 3) & !3;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        assert_eq!(queue.used_ring(), used, "used ring moved");
        Vq {
            mem,
            mock,
            queue,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Chain `c` is descriptors `2c` (header) and `2c + 1` (data).
    fn set_chain(&self, c: u16, hdr_at: u64, data_at: u64, data_len: u32, write: bool) {
        let w = if write { F_WRITE } else { 0 };
        let table = self.mock.desc_table();
        table
            .store(
                2 * c,
                RawDescriptor::from(SplitDescriptor::new(hdr_at, HDR, w | F_NEXT, 2 * c + 1)),
            )
            .expect("store header descriptor");
        table
            .store(
                2 * c + 1,
                RawDescriptor::from(SplitDescriptor::new(data_at, data_len, w, 0)),
            )
            .expect("store data descriptor");
    }

    fn offer(&mut self, chain: u16) {
        let avail = self.mock.avail_addr();
        let slot = avail.unchecked_add(4 + 2 * u64::from(self.avail_idx % RING));
        self.mem
            .write_obj((2 * chain).to_le(), slot)
            .expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), avail.unchecked_add(2))
            .expect("avail idx");
    }

    /// The next used element: (chain, written length).
    fn take_used(&mut self) -> Option<(u16, u32)> {
        let used = GuestAddress(self.queue.used_ring());
        let idx = u16::from_le(self.mem.read_obj(used.unchecked_add(2)).expect("used idx"));
        if idx == self.used_seen {
            return None;
        }
        let e = used.unchecked_add(4 + 8 * u64::from(self.used_seen % RING));
        let id = u32::from_le(self.mem.read_obj(e).expect("used id"));
        let len = u32::from_le(self.mem.read_obj(e.unchecked_add(4)).expect("used len"));
        self.used_seen = self.used_seen.wrapping_add(1);
        Some(((id / 2) as u16, len))
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The device, its rings, and a guest driver model with one stream connection.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    tx: Vq<'a>,
    rx: Vq<'a>,
    tx_next: u16,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    device: Device,
    /// The connection: guest port, host port.
    gport: u32,
    hport: u32,
    /// Guest -> host credit as the guest knows it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    sent: u32,
    /// Host -> guest: bytes the guest consumed, and what it last told the device.
    fwd_cnt: u32,
    reported_fwd_cnt: u32,
    /// Times the guest had to ask for credit (OP_CREDIT_REQUEST): the device's updates did not
    /// keep up with a guest that only waits for them.
    credit_requests: u64,
    _dir: TempDir,
}

/// What the guest took off its RX ring.
#[derive(Default)]
struct Received {
    bytes: usize,
    packets: usize,
    data: Option<Vec<u8>>,
    ctrl: Vec<Header>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vmlink-vhost-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = DeviceConfig::new(CID, dir.join("v"));
        let device = Device::new(cfg, Arc::new(Counters::default())).expect("device");
        let tx = Vq::new(mem, TX_RING_AT);
        let mut rx = Vq::new(mem, RX_RING_AT);
        for c in 0..CHAINS {
            let at = TX_BUFS + u64::from(c) * TX_SLOT;
            tx.set_chain(c, at, at + 64, MAX_PKT_DATA as u32, false);
            let at = RX_BUFS + u64::from(c) * RX_SLOT;
            rx.set_chain(c, at, at + 64, RX_BUF, true);
            rx.offer(c);
        }
        Rig {
            mem,
            tx,
            rx,
            tx_next: 0,
            tx_buf: Vec::new(),
            rx_buf: Vec::new(),
            device,
            gport: 0,
            hport: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            sent: 0,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            credit_requests: 0,
            _dir: TempDir(dir),
        }
    }

    fn header(&self, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: self.gport,
            dst_port: self.hport,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.sent.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Puts one packet on the TX ring (not yet processed). With `data`, the payload is written
    /// to the chain's data buffer; without it the buffer already holds `len` bytes.
    fn queue_tx(&mut self, h: Header, data: Option<&[u8]>) {
        let c = self.tx_next;
        self.tx_next = (self.tx_next + 1) % CHAINS;
        let at = TX_BUFS + u64::from(c) * TX_SLOT;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .expect("write header");
        if let Some(d) = data {
            self.mem
                .write_slice(d, GuestAddress(at + 64))
                .expect("write data");
        }
        if h.op == OP_RW {
            self.sent = self.sent.wrapping_add(h.len);
        }
        if h.op != OP_REQUEST {
            self.reported_fwd_cnt = h.fwd_cnt;
        }
        self.tx.offer(c);
    }

    /// Runs the device's TX path over everything queued; returns descriptors used.
    fn run_tx(&mut self) -> usize {
        let n = drain_tx(
            &mut self.device,
            &mut self.tx.queue,
            self.mem,
            &mut self.tx_buf,
            None,
        );
        // The guest frees its TX buffers.
        while self.tx.take_used().is_some() {}
        n
    }

    /// Host events, then RX: every packet the device has goes into the RX ring, the guest
    /// consumes it (payload counted, and kept with `keep`) and re-offers the buffer.
    fn run_rx(&mut self, keep: bool) -> Received {
        let mut got = Received {
            data: keep.then(Vec::new),
            ..Received::default()
        };
        loop {
            self.device.handle_host_events();
            let used = fill_rx(
                &mut self.device,
                &mut self.rx.queue,
                self.mem,
                &mut self.rx_buf,
                None,
            );
            if !used {
                return got;
            }
            while let Some((c, len)) = self.rx.take_used() {
                let at = RX_BUFS + u64::from(c) * RX_SLOT;
                let mut hb = [0u8; HDR as usize];
                self.mem
                    .read_slice(&mut hb, GuestAddress(at))
                    .expect("read header");
                let h = Header::from_bytes(&hb);
                assert_eq!(
                    len,
                    HDR + h.len,
                    "used length is header + payload: chain {c} {h:?} used_seen {}",
                    self.rx.used_seen
                );
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID));
                self.peer_buf_alloc = h.buf_alloc;
                self.peer_fwd_cnt = h.fwd_cnt;
                if h.op == OP_RW {
                    got.bytes += h.len as usize;
                    got.packets += 1;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(h.len);
                    if let Some(d) = &mut got.data {
                        let start = d.len();
                        d.resize(start + h.len as usize, 0);
                        self.mem
                            .read_slice(&mut d[start..], GuestAddress(at + 64))
                            .expect("read data");
                    }
                } else {
                    got.ctrl.push(h);
                }
                self.rx.offer(c);
            }
            // Like the backend: look at the host side again only while the device has more.
            if !self.device.has_rx() {
                return got;
            }
        }
    }

    /// Like Linux: tell the device about consumed bytes once the space it believes the guest
    /// has left (the guest consumes at once, so: what it has not been told about) falls under
    /// one maximal packet.
    fn maybe_credit_update(&mut self) {
        let unreported = self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt);
        if GUEST_BUF_ALLOC.saturating_sub(unreported) < MAX_PKT_DATA as u32 {
            let h = self.header(OP_CREDIT_UPDATE, 0);
            self.queue_tx(h, None);
            self.run_tx();
        }
    }

    /// The guest connects to host port `hport` (a listener on `<uds>_<hport>`).
    fn connect_from_guest(&mut self, gport: u32, hport: u32) -> UnixStream {
        let p = self.device.config().uds_path.clone();
        let l = UnixListener::bind(format!("{}_{hport}", p.display())).expect("bind host port");
        self.gport = gport;
        self.hport = hport;
        let h = self.header(OP_REQUEST, 0);
        self.queue_tx(h, None);
        assert_eq!(self.run_tx(), 2);
        let got = self.run_rx(false);
        assert_eq!(got.ctrl.len(), 1);
        assert_eq!(got.ctrl[0].op, OP_RESPONSE);
        let (host, _) = l.accept().expect("device connected to the host listener");
        host
    }

    /// A host client connects through `CONNECT <gport>\n`; the guest accepts.
    fn connect_from_host(&mut self, gport: u32) -> UnixStream {
        let mut c = UnixStream::connect(&self.device.config().uds_path).expect("connect");
        c.write_all(format!("CONNECT {gport}\n").as_bytes())
            .expect("write CONNECT");
        let got = self.run_rx(false);
        assert_eq!(got.ctrl.len(), 1);
        let req = got.ctrl[0];
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, gport));
        self.gport = gport;
        self.hport = req.src_port;
        let h = self.header(OP_RESPONSE, 0);
        self.queue_tx(h, None);
        assert_eq!(self.run_tx(), 2);
        let want = format!("OK {}\n", self.hport);
        let mut line = vec![0u8; want.len()];
        c.read_exact(&mut line).expect("OK line");
        assert_eq!(line, want.as_bytes());
        c
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// Non-blocking read of what is there; `Ok(0)` when nothing is.
fn read_some(s: &mut UnixStream, buf: &mut [u8]) -> usize {
    match s.read(buf) {
        Ok(0) => panic!("host socket closed"),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("host read: {e}"),
    }
}

fn write_some(s: &mut UnixStream, buf: &[u8]) -> usize {
    match s.write(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("host write: {e}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

// ------------------------------------------------------------------------------ guest -> host

struct Tx<'a> {
    rig: Rig<'a>,
    host: UnixStream,
    pkt: usize,
    sink: Vec<u8>,
}

impl Tx<'_> {
    /// One batch: BATCH bytes in packets of `pkt` bytes (the chains' data buffers already hold
    /// them), within the guest's credit; the host reads them all. Returns what it read when
    /// `keep`.
    fn iteration(&mut self, keep: bool) -> Option<Vec<u8>> {
        let rig = &mut self.rig;
        let n = BATCH / self.pkt;
        if rig.credit() < BATCH as u32 {
            // A guest with nothing to send would now sleep until a credit update; the device
            // sends one on its tick at the latest. Ask instead, and count it.
            rig.credit_requests += 1;
            let h = rig.header(OP_CREDIT_REQUEST, 0);
            rig.queue_tx(h, None);
            rig.run_tx();
            rig.run_rx(false);
            assert!(rig.credit() >= BATCH as u32, "no credit: the flow stalled");
        }
        // The batch's chains are 0..n, whose data buffers hold its bytes.
        rig.tx_next = 0;
        for _ in 0..n {
            let h = rig.header(OP_RW, self.pkt as u32);
            rig.queue_tx(h, None);
        }
        assert_eq!(rig.run_tx(), 2 * n);
        let mut kept = keep.then(Vec::new);
        let mut got = 0;
        let mut idle = 0;
        while got < BATCH {
            let r = read_some(&mut self.host, &mut self.sink);
            if r == 0 {
                // Host socket drained: the device hears it is writable and flushes its buffer.
                rig.device.handle_host_events();
                idle += 1;
                assert!(idle < 1_000_000, "guest -> host stalled");
                continue;
            }
            if let Some(k) = &mut kept {
                k.extend_from_slice(&self.sink[..r]);
            }
            got += r;
        }
        assert_eq!(got, BATCH, "the host read exactly what the guest sent");
        // The guest takes its credit updates.
        let rx = rig.run_rx(false);
        assert_eq!(rx.bytes, 0);
        kept
    }
}

fn bench_tx(c: &mut Criterion) {
    let mut g = c.benchmark_group("tx");
    g.throughput(Throughput::Bytes(BATCH as u64));
    for (label, pkt) in [("64KiB", 64 * 1024), ("4KiB", 4 * 1024)] {
        let mem = memory();
        let mut rig = Rig::new(&mem, &format!("tx{pkt}"));
        let host = rig.connect_from_guest(5000, 1234);
        host.set_nonblocking(true).expect("non-blocking");
        // Each chain's data buffer holds its own pattern, written once: what a batch sends.
        let n = BATCH / pkt;
        let mut want = Vec::with_capacity(BATCH);
        for c in 0..n {
            let d = pattern(pkt, c as u8);
            let at = TX_BUFS + c as u64 * TX_SLOT + 64;
            mem.write_slice(&d, GuestAddress(at)).expect("data");
            want.extend_from_slice(&d);
        }
        let mut tx = Tx {
            rig,
            host,
            pkt,
            sink: vec![0u8; BATCH],
        };
        // Checked: the bytes arrive intact and in order, twice (the second on recycled chains
        // and credit the device gave back).
        for _ in 0..2 {
            let got = tx.iteration(true).expect("kept");
            assert!(got == want, "guest -> host bytes differ");
        }
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| tx.iteration(false))
        });
        if tx.rig.credit_requests > 0 {
            eprintln!(
                "tx/{label}: the guest asked for credit {} times",
                tx.rig.credit_requests
            );
        }
    }
    g.finish();
}

// ------------------------------------------------------------------------------ host -> guest

struct Rx<'a> {
    rig: Rig<'a>,
    host: UnixStream,
    data: Vec<u8>,
}

impl Rx<'_> {
    /// The host writes BATCH bytes as fast as its socket takes them; the device fills 4 KiB RX
    /// buffers, the guest consumes and recycles them and returns credit.
    fn iteration(&mut self, keep: bool) -> Received {
        let rig = &mut self.rig;
        let mut written = 0;
        let mut total = Received {
            data: keep.then(Vec::new),
            ..Received::default()
        };
        let mut idle = 0;
        while total.bytes < BATCH {
            if written < BATCH {
                written += write_some(&mut self.host, &self.data[written..]);
            }
            let got = rig.run_rx(keep);
            if got.bytes == 0 {
                idle += 1;
                assert!(idle < 1_000_000, "host -> guest stalled");
            }
            total.bytes += got.bytes;
            total.packets += got.packets;
            if let (Some(t), Some(d)) = (&mut total.data, got.data) {
                t.extend_from_slice(&d);
            }
            rig.maybe_credit_update();
        }
        assert_eq!(
            total.bytes, BATCH,
            "the guest got exactly what the host wrote"
        );
        total
    }
}

fn bench_rx(c: &mut Criterion) {
    let mut g = c.benchmark_group("rx");
    g.throughput(Throughput::Bytes(BATCH as u64));
    let mem = memory();
    let mut rig = Rig::new(&mem, "rx");
    let host = rig.connect_from_host(6000);
    host.set_nonblocking(true).expect("non-blocking");
    let mut rx = Rx {
        rig,
        host,
        data: pattern(BATCH, 1),
    };
    for _ in 0..2 {
        let got = rx.iteration(true);
        assert!(
            got.data.as_deref() == Some(&rx.data[..]),
            "host -> guest bytes differ"
        );
        // 4 KiB packets, and a shorter one where a read found the host's bytes cut short.
        assert!(
            got.packets >= BATCH / RX_BUF as usize,
            "at most 4 KiB a packet"
        );
    }
    g.bench_function(BenchmarkId::from_parameter("4KiB-bufs"), |b| {
        b.iter(|| rx.iteration(false))
    });
    g.finish();
}

// ------------------------------------------------------------------------------ round trip

struct RoundTrip<'a> {
    rig: Rig<'a>,
    host: UnixStream,
    n: u8,
}

impl RoundTrip<'_> {
    /// Host writes 1 byte; the guest receives it and answers it + 1; the host reads that.
    fn iteration(&mut self) {
        let rig = &mut self.rig;
        self.n = self.n.wrapping_add(1);
        self.host.write_all(&[self.n]).expect("host write");
        let mut got = rig.run_rx(true);
        let mut idle = 0;
        while got.bytes == 0 {
            // Control packets only (a credit update, the tick): the byte is still coming.
            idle += 1;
            assert!(idle < 1_000_000, "host -> guest byte stalled");
            got = rig.run_rx(true);
        }
        let data = got.data.expect("kept");
        assert_eq!(data, [self.n], "host -> guest byte");
        let h = rig.header(OP_RW, 1);
        rig.queue_tx(h, Some(&[self.n.wrapping_add(1)]));
        assert_eq!(rig.run_tx(), 2);
        let mut b = [0u8; 1];
        self.host.read_exact(&mut b).expect("host read");
        assert_eq!(b[0], self.n.wrapping_add(1), "guest -> host byte");
    }
}

fn bench_roundtrip(c: &mut Criterion) {
    let mut g = c.benchmark_group("roundtrip");
    g.throughput(Throughput::Elements(1));
    let mem = memory();
    let mut rig = Rig::new(&mem, "rt");
    let host = rig.connect_from_host(7000);
    let mut rt = RoundTrip { rig, host, n: 0 };
    rt.iteration();
    g.bench_function(BenchmarkId::from_parameter("1B"), |b| {
        b.iter(|| rt.iteration())
    });
    g.finish();
}

criterion_group!(benches, bench_tx, bench_rx, bench_roundtrip);
criterion_main!(benches);
