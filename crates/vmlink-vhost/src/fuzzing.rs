//! A harness that feeds arbitrary bytes to the TX path as a guest would: its own descriptor
//! table, avail ring and guest memory contents. Used by the fuzz target `vhost_tx`
//! (`fuzz/fuzz_targets/vhost_tx.rs`) and by a test that runs it on pseudo-random inputs.
//!
//! Input layout: byte 0 is the number of descriptors `n` (mod 17); then `n` raw descriptors of
//! 16 bytes (`addr` u64, `len` u32, `flags` u16, `next` u16, little-endian, used as given); then
//! one byte `k` (mod 17) and `k` head indexes for the avail ring; the rest is copied into guest
//! memory at [`DATA`] (so headers and payloads are the input's too).
//!
//! The host side is there too, so that connections open and the established-connection code
//! (data, credit, seqpacket assembly, shutdown) is reached: stream listeners on host ports 0, 1
//! and 2 and a seqpacket listener on port 3 ([`HOST_PORTS`]). After each input the harness
//! accepts what connected, greets each new connection with a few bytes (data toward the guest),
//! reads what waits on every one it holds, and closes the oldest beyond [`HELD`] (a host
//! hang-up).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::backend::{drain_tx, fill_rx};
use crate::counters::Counters;
use crate::device::{listen_seqpacket, Device, DeviceConfig};

/// Host ports with a listener: `(port, seqpacket)`.
pub const HOST_PORTS: [(u32, bool); 4] = [(0, false), (1, false), (2, false), (3, true)];
/// Most host sides of connections the harness keeps open; older ones are closed.
pub const HELD: usize = 32;

/// Guest memory size.
pub const MEM_SIZE: usize = 1 << 20;
/// Where the input's trailing bytes go in guest memory.
pub const DATA: u64 = 0x1_0000;
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x2000;
const RX_DESC: u64 = 0x4000;
const RX_AVAIL: u64 = 0x5000;
const RX_USED: u64 = 0x6000;
const RX_BUFS: u64 = 0x8_0000;
const QSIZE: u16 = 16;

/// A device and guest memory reused across inputs.
#[derive(Debug)]
pub struct TxHarness {
    device: Device,
    mem: GuestMemoryMmap,
    buf: Vec<u8>,
    dir: PathBuf,
    listeners: Vec<UnixListener>,
    held: VecDeque<UnixStream>,
    accepted: u64,
}

impl Drop for TxHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn queue(desc: u64, avail: u64, used: u64) -> Queue {
    // 16 is a valid queue size, so `new` cannot fail.
    let mut q = Queue::new(QSIZE).unwrap_or_else(|_| unreachable!("16 is a valid queue size"));
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    q
}

impl TxHarness {
    /// A harness whose device's host side lives in a fresh directory under the temp dir.
    pub fn new() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "vmlink-vhost-fuzz-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cfg = DeviceConfig::new(3, dir.join("v"));
        cfg.max_connections = 64;
        let device = Device::new(cfg, Arc::new(Counters::default())).map_err(io::Error::other)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(io::Error::other)?;
        let mut listeners = Vec::new();
        for (port, seqpacket) in HOST_PORTS {
            let path = dir.join(format!("v_{port}"));
            let _ = std::fs::remove_file(&path);
            let l = if seqpacket {
                listen_seqpacket(&path)?
            } else {
                UnixListener::bind(&path)?
            };
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
        Ok(TxHarness {
            device,
            mem,
            buf: Vec::new(),
            dir,
            listeners,
            held: VecDeque::new(),
            accepted: 0,
        })
    }

    /// The device (for its counters).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How many connections the host listeners accepted in all.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// The host side: accepts, greets, reads, and closes the oldest beyond [`HELD`].
    fn serve_host(&mut self) {
        for l in &self.listeners {
            while let Ok((s, _)) = l.accept() {
                if s.set_nonblocking(true).is_err() {
                    continue;
                }
                let mut s = s;
                let _ = s.write(b"hello guest");
                self.accepted += 1;
                self.held.push_back(s);
            }
        }
        let mut b = [0u8; 4096];
        for s in &mut self.held {
            // A bounded read per input: a guest's flood stays in the device's buffers.
            for _ in 0..4 {
                match s.read(&mut b) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        while self.held.len() > HELD {
            self.held.pop_front();
        }
    }

    /// Runs one input through the TX path, then gives the device RX buffers for its answers.
    pub fn run(&mut self, input: &[u8]) {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let s = input.get(at..at + n);
            at += n;
            s
        };
        let zero = [0u8; 0x3000];
        let _ = self.mem.write_slice(&zero, GuestAddress(0));
        let n = take(1).map_or(0, |b| b[0] % (QSIZE as u8 + 1));
        for i in 0..u64::from(n) {
            if let Some(d) = take(16) {
                let _ = self.mem.write_slice(d, GuestAddress(TX_DESC + 16 * i));
            }
        }
        let k = take(1).map_or(0, |b| b[0] % (QSIZE as u8 + 1));
        let mut heads = Vec::new();
        for _ in 0..k {
            if let Some(h) = take(1) {
                heads.push(u16::from(h[0]));
            }
        }
        for (i, h) in heads.iter().enumerate() {
            let _ = self
                .mem
                .write_obj(*h, GuestAddress(TX_AVAIL + 4 + 2 * i as u64));
        }
        let _ = self
            .mem
            .write_obj(heads.len() as u16, GuestAddress(TX_AVAIL + 2));
        if let Some(rest) = input.get(at..) {
            let len = rest.len().min(MEM_SIZE / 2 - DATA as usize);
            let _ = self.mem.write_slice(&rest[..len], GuestAddress(DATA));
        }
        let mut tx = queue(TX_DESC, TX_AVAIL, TX_USED);
        drain_tx(&mut self.device, &mut tx, &self.mem, &mut self.buf, None);
        self.serve_host();

        // Well-formed RX buffers: header then 4 KiB, write-only.
        let _ = self.mem.write_slice(&zero, GuestAddress(RX_DESC));
        for i in 0..QSIZE / 2 {
            let base = RX_BUFS + u64::from(i) * 0x2000;
            let d = 2 * u64::from(i);
            let _ = self.mem.write_obj(base, GuestAddress(RX_DESC + 16 * d));
            let _ = self
                .mem
                .write_obj(44u32, GuestAddress(RX_DESC + 16 * d + 8));
            let _ = self
                .mem
                .write_obj(3u16, GuestAddress(RX_DESC + 16 * d + 12));
            let _ = self
                .mem
                .write_obj(d as u16 + 1, GuestAddress(RX_DESC + 16 * d + 14));
            let _ = self
                .mem
                .write_obj(base + 64, GuestAddress(RX_DESC + 16 * (d + 1)));
            let _ = self
                .mem
                .write_obj(4096u32, GuestAddress(RX_DESC + 16 * (d + 1) + 8));
            let _ = self
                .mem
                .write_obj(2u16, GuestAddress(RX_DESC + 16 * (d + 1) + 12));
            let _ = self
                .mem
                .write_obj(d as u16, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(i)));
        }
        let _ = self.mem.write_obj(QSIZE / 2, GuestAddress(RX_AVAIL + 2));
        let mut rx = queue(RX_DESC, RX_AVAIL, RX_USED);
        self.device.handle_host_events();
        fill_rx(&mut self.device, &mut rx, &self.mem, &mut self.buf, None);
    }
}
