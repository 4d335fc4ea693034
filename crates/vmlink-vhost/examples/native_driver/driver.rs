//! The guest's virtio-vsock driver, modelled on Linux 6.1 (`net/vmw_vsock/virtio_transport.c`,
//! `virtio_transport_common.c`), with a tiny "application" per connection in place of the
//! guest's sockets.
//!
//! Modelled: 64 RX buffers of a 44-byte header descriptor and a 4 KiB payload descriptor (6.1's
//! `virtio_vsock_rx_fill`, the RX ring full), refilled once fewer than half are posted, one kick
//! per refill; TX packets of a header and up to 64 KiB of payload, each within the peer's credit
//! (`virtio_transport_get_credit`), one kick per batch; TX buffers reclaimed only on a TX
//! interrupt (`virtio_transport_tx_work`); interrupts re-armed after each pass with a recheck
//! (`virtqueue_enable_cb`); a 256 KiB `buf_alloc` per connection; a CREDIT_UPDATE when the
//! space the peer knows of falls under 64 KiB (`virtio_transport_stream_do_dequeue`: the
//! application reads at once here); CREDIT_REQUEST answered; REQUEST/RESPONSE/RW/SHUTDOWN/RST
//! for stream sockets as `virtio_transport_recv_pkt` handles them: a full peer SHUTDOWN with
//! nothing unread is answered with RST, a local close sends SHUTDOWN(RCV|SEND) and waits for
//! the peer's RST (8 s, `VSOCK_CLOSE_TIMEOUT`, then RST).
//!
//! Not modelled: the socket layer's own queues and wake-ups, `SO_RCVLOWAT`, the limit on
//! queued replies (`virtio_transport_more_replies`), seqpacket, the event queue.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use super::machine::{
    wait_readable, Desc, Machine, DATA_OFFSET, QUEUE_SIZE, RX_BUFS_AT, RX_SLOT, TX_BUFS_AT, TX_SLOT,
};

// The virtio spec's numbers, from the backend library (the wire values are checked there).
pub use vmlink_vhost::device::{
    HEADER_LEN as HDR_LEN, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// Linux's default receive buffer per connection (`VIRTIO_VSOCK_DEFAULT_BUF_SIZE`).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest TX payload (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`), also the credit-update threshold.
pub const MAX_PKT: u32 = 64 * 1024;
/// RX buffer payload size (`VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`).
pub const RX_BUF: u32 = 4096;
/// Every packet is a 2-descriptor chain, so a ring holds half its size in packets.
const CHAINS: u16 = QUEUE_SIZE / 2;
/// How long a closing connection waits for the peer's RST (`VSOCK_CLOSE_TIMEOUT`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// Bound on bytes an echoing connection holds before it has credit to send them back.
const ECHO_LIMIT: usize = 4 << 20;
/// First local port of guest-initiated connections.
const FIRST_LOCAL_PORT: u32 = 49152;

/// `struct virtio_vsock_hdr`: the backend library's own header type (44 bytes on the wire,
/// little-endian, `to_bytes`/`from_bytes`).
pub use vmlink_vhost::device::Header as Hdr;

/// The byte stream every endpoint sends and checks: byte `i` of a stream with seed `s` is
/// `(i + 41 s) mod 251`. Guest -> host streams are seeded from the host port; a host -> guest
/// stream's seed is the host's choice (the connection's index), which the guest learns from
/// the first byte (41 is invertible mod 251), since the port numbers the host sees differ
/// between backends (vmlink-vhost answers `OK <host-side port>`, vhost-device-vsock 0.3.0
/// `OK <guest port>`). Streams of different seeds are out of phase, so bytes of one
/// connection turning up in another fail the check.
#[derive(Debug)]
pub struct Pattern {
    table: Vec<u8>,
}

/// The largest slice [`Pattern::slice`] gives.
pub const PATTERN_MAX: usize = 256 * 1024;

impl Pattern {
    pub fn new() -> Pattern {
        Pattern {
            table: (0..PATTERN_MAX + 251).map(|i| (i % 251) as u8).collect(),
        }
    }

    /// Bytes `offset .. offset + len` of stream `seed` (`len` <= [`PATTERN_MAX`]).
    pub fn slice(&self, seed: u32, offset: u64, len: usize) -> &[u8] {
        let start = ((offset + 41 * u64::from(seed)) % 251) as usize;
        &self.table[start..start + len]
    }

    /// The seed (mod 251) of a stream whose byte 0 is `first` (49 = 41^-1 mod 251).
    pub fn seed_of_first(first: u8) -> u32 {
        (u32::from(first) * 49) % 251
    }

    /// The seed of the guest -> host direction of a connection to host port `port`.
    pub fn to_host_seed(port: u32) -> u32 {
        port
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::new()
    }
}

/// What a connection's guest application reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    /// Nothing: it writes, then closes.
    Nothing,
    /// Exactly this many bytes of the to-guest pattern, then end of stream.
    Expect(u64),
    /// Whatever comes, written back as it comes.
    Echo,
}

/// A guest application on one connection.
#[derive(Clone, Copy, Debug)]
pub struct App {
    /// Bytes it writes (the to-host pattern).
    pub send: u64,
    /// After writing: `shutdown(SHUT_WR)` and keep reading (true), or just go on.
    pub half_close: bool,
    pub recv: Recv,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum CloseKind {
    /// SHUTDOWN then RST, in either direction, with the application done.
    Clean,
    /// RST on an established connection once everything was sent and read and the guest had
    /// shut down its sending side: no SHUTDOWN from the peer first, but Linux's `do_close`
    /// reads such an RST as end of stream, without an error for the application.
    DoneThenReset,
    /// The peer reset an established connection, or shut it down with the application not done.
    Reset,
    /// The peer answered REQUEST with RST.
    Refused,
    /// The guest closed and no RST came within 8 s (the guest then sent one).
    CloseTimeout,
}

impl CloseKind {
    /// Whether a Linux guest application would see an orderly end.
    pub fn is_clean(self) -> bool {
        matches!(self, CloseKind::Clean | CloseKind::DoneThenReset)
    }
}

/// A finished connection.
#[derive(Clone, Debug)]
pub struct ConnReport {
    pub local_port: u32,
    pub peer_port: u32,
    pub sent: u64,
    pub received: u64,
    pub close: CloseKind,
    pub opened_at: Instant,
    /// When the application consumed its last byte.
    pub last_rx_at: Option<Instant>,
    pub closed_at: Instant,
}

/// Counters of one driver session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_interrupts: u64,
    pub tx_interrupts: u64,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    /// Kicks the device's `avail_event` (or NO_NOTIFY) said were not needed.
    pub kicks_saved: u64,
    pub credit_updates_sent: u64,
    pub credit_requests_answered: u64,
    /// Times a sender had bytes but no credit.
    pub credit_waits: u64,
    /// Times a packet waited for a free TX buffer.
    pub tx_ring_full: u64,
    /// Bytes the device sent beyond the credit this driver had given.
    pub credit_overrun_bytes: u64,
    /// Packets other than RST for no known connection (answered with RST, as Linux does).
    pub unknown_packets: u64,
    /// RSTs for no known connection (dropped, as Linux does): answers to packets that
    /// crossed the peer's own close.
    pub stray_resets: u64,
    /// The first of those, and how long before it its connection ended.
    pub first_unknown: Option<String>,
    /// Packets of a connection with an op Linux does not know (dropped, as Linux does).
    pub invalid_op_packets: u64,
    /// The first of those, with the connection's state.
    pub first_invalid_op: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    /// The guest sent SHUTDOWN(RCV|SEND) and waits for the peer's RST.
    Closing(Instant),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Closing(_) => "closing (guest sent SHUTDOWN, waits for RST)",
        }
    }
}

type Key = (u32, u32);

#[derive(Debug)]
struct Conn {
    local_port: u32,
    peer_port: u32,
    state: State,
    app: App,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent (`tx_cnt`).
    tx_cnt: u32,
    /// Bytes received and consumed (`rx_cnt` = `fwd_cnt`: the application reads at once).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer (`last_fwd_cnt`).
    last_fwd_cnt: u32,
    credit_update_queued: bool,
    waiting_credit: bool,
    peer_shutdown: u32,
    local_shutdown: u32,
    sent: u64,
    received: u64,
    echo: VecDeque<u8>,
    /// The seed of the stream it reads, from its first byte.
    rx_seed: Option<u32>,
    opened_at: Instant,
    last_rx_at: Option<Instant>,
}

impl Conn {
    fn new(local_port: u32, peer_port: u32, state: State, app: App) -> Conn {
        Conn {
            local_port,
            peer_port,
            state,
            app,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt: 0,
            credit_update_queued: false,
            waiting_credit: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            sent: 0,
            received: 0,
            echo: VecDeque::new(),
            rx_seed: None,
            opened_at: Instant::now(),
            last_rx_at: None,
        }
    }

    /// The host-side port, which seeds both directions' patterns.
    fn host_port(&self) -> u32 {
        self.peer_port
    }

    fn unsent(&self) -> u64 {
        match self.app.recv {
            Recv::Echo => self.echo.len() as u64,
            _ => self.app.send - self.sent,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn app_done_reading(&self) -> bool {
        match self.app.recv {
            Recv::Nothing | Recv::Echo => true,
            Recv::Expect(n) => self.received == n,
        }
    }

    fn report(&self, close: CloseKind) -> ConnReport {
        ConnReport {
            local_port: self.local_port,
            peer_port: self.peer_port,
            sent: self.sent,
            received: self.received,
            close,
            opened_at: self.opened_at,
            last_rx_at: self.last_rx_at,
            closed_at: Instant::now(),
        }
    }
}

/// The RST a guest with CID `cid` answers the host's packet `h` with.
fn rst_reply(cid: u64, h: &Hdr) -> Hdr {
    Hdr {
        src_cid: cid,
        dst_cid: HOST_CID,
        src_port: h.dst_port,
        dst_port: h.src_port,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Hdr::default()
    }
}

/// A packet of connection `c` from CID `cid`, with its credit fields now.
fn header(cid: u64, c: &Conn, op: u16, flags: u32, len: u32) -> Hdr {
    Hdr {
        src_cid: cid,
        dst_cid: HOST_CID,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

/// A packet waiting for a TX buffer that carries no payload.
#[derive(Clone, Copy, Debug)]
enum Ctrl {
    /// For a connection: built when sent, with the connection's credit fields then.
    Conn { key: Key, op: u16, flags: u32 },
    /// A reply to a packet of no connection.
    Raw(Hdr),
}

/// The driver: the machine, connections, listeners, what waits to be sent.
#[derive(Debug)]
pub struct Driver {
    m: Machine,
    cid: u64,
    conns: HashMap<Key, Conn>,
    listeners: HashMap<u32, App>,
    ctrl: VecDeque<Ctrl>,
    /// Connections with bytes to send, in turn.
    senders: VecDeque<Key>,
    tx_free: Vec<u16>,
    rx_free: Vec<u16>,
    rx_posted: u16,
    next_port: u32,
    pattern: Pattern,
    scratch: Vec<u8>,
    /// Connections that ended, oldest first.
    pub done: Vec<ConnReport>,
    pub stats: Stats,
}

impl Driver {
    /// Takes over a machine whose backend is up: posts every RX buffer and kicks.
    pub fn new(m: Machine, cid: u64) -> Result<Driver> {
        let mut d = Driver {
            m,
            cid,
            conns: HashMap::new(),
            listeners: HashMap::new(),
            ctrl: VecDeque::new(),
            senders: VecDeque::new(),
            tx_free: (0..CHAINS).rev().collect(),
            rx_free: Vec::new(),
            rx_posted: 0,
            next_port: FIRST_LOCAL_PORT,
            pattern: Pattern::new(),
            scratch: vec![0u8; RX_BUF as usize],
            done: Vec::new(),
            stats: Stats::default(),
        };
        for c in 0..CHAINS {
            let at = RX_BUFS_AT + u64::from(c) * RX_SLOT;
            d.m.rx.write_chain(
                &d.m.mem,
                2 * c,
                &[
                    Desc {
                        addr: at,
                        len: HDR_LEN as u32,
                        device_writes: true,
                    },
                    Desc {
                        addr: at + DATA_OFFSET,
                        len: RX_BUF,
                        device_writes: true,
                    },
                ],
            );
            d.rx_free.push(c);
        }
        d.refill_rx()?;
        d.m.rx.enable_interrupts(&d.m.mem);
        d.m.tx.enable_interrupts(&d.m.mem);
        Ok(d)
    }

    pub fn event_idx(&self) -> bool {
        self.m.event_idx
    }

    /// Accept connections to guest port `port`, each served by `app`.
    pub fn listen(&mut self, port: u32, app: App) {
        self.listeners.insert(port, app);
    }

    pub fn unlisten(&mut self, port: u32) {
        self.listeners.remove(&port);
    }

    /// Connects to host port `port` (hybrid vsock: the listener at `<uds-path>_<port>`);
    /// returns the local port.
    pub fn connect(&mut self, port: u32, app: App) -> u32 {
        let local = self.next_port;
        self.next_port += 1;
        let key = (local, port);
        self.conns
            .insert(key, Conn::new(local, port, State::Connecting, app));
        self.ctrl.push_back(Ctrl::Conn {
            key,
            op: OP_REQUEST,
            flags: 0,
        });
        local
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.conns.len()
    }

    /// Runs the driver until `done` holds, failing after `timeout` with what was still open.
    pub fn run_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Driver) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush_tx()?;
            if done(self) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{what}: not done after {timeout:?}; open connections: {}; stats {:?}",
                    self.describe_open(),
                    self.stats
                );
            }
            let mut wait = deadline - now;
            if let Some(first) = self.close_deadline() {
                wait = wait.min(first.saturating_duration_since(now));
            }
            let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
            let ready = wait_readable(&[&self.m.rx.call, &self.m.tx.call], ms)?;
            if ready[0] {
                let _ = self.m.rx.call.read();
                self.stats.rx_interrupts += 1;
                self.rx_work()?;
            }
            if ready[1] {
                let _ = self.m.tx.call.read();
                self.stats.tx_interrupts += 1;
                self.tx_work();
            }
            self.expire_closing();
        }
    }

    fn describe_open(&self) -> String {
        let mut v: Vec<String> = self
            .conns
            .values()
            .take(8)
            .map(|c| {
                format!(
                    "{}->{} {:?} sent {}/{} received {} peer_shutdown {} credit {}",
                    c.local_port,
                    c.peer_port,
                    c.state,
                    c.sent,
                    c.app.send,
                    c.received,
                    c.peer_shutdown,
                    c.credit()
                )
            })
            .collect();
        if self.conns.len() > 8 {
            v.push(format!("and {} more", self.conns.len() - 8));
        }
        if v.is_empty() {
            "none".into()
        } else {
            v.join("; ")
        }
    }

    fn close_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c.state {
                State::Closing(t) => Some(t + CLOSE_TIMEOUT),
                _ => None,
            })
            .min()
    }

    /// Linux's close timeout: a closing connection whose peer never sent RST is reset.
    fn expire_closing(&mut self) {
        let now = Instant::now();
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Closing(t) if now >= t + CLOSE_TIMEOUT))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(c) = self.conns.get(&key) {
                let rst = header(self.cid, c, OP_RST, 0, 0);
                self.ctrl.push_back(Ctrl::Raw(rst));
            }
            self.finish(key, CloseKind::CloseTimeout);
        }
    }

    fn finish(&mut self, key: Key, close: CloseKind) {
        if let Some(c) = self.conns.remove(&key) {
            self.done.push(c.report(close));
        }
    }

    // ------------------------------------------------------------------------------ RX

    /// Offers every free RX buffer and kicks (`virtio_vsock_rx_fill`).
    fn refill_rx(&mut self) -> Result<()> {
        while let Some(c) = self.rx_free.pop() {
            self.m.rx.offer(&self.m.mem, 2 * c);
            self.rx_posted += 1;
        }
        let before = self.m.rx.kicks;
        self.m.rx.kick(&self.m.mem)?;
        self.stats.rx_kicks += self.m.rx.kicks - before;
        Ok(())
    }

    /// `virtio_transport_rx_work`: every used RX buffer, with interrupts re-armed and the ring
    /// looked at again until it stays empty; then a refill below half.
    fn rx_work(&mut self) -> Result<()> {
        loop {
            self.m.rx.disable_interrupts(&self.m.mem);
            while let Some((head, len)) = self.m.rx.take_used(&self.m.mem) {
                let c = head / 2;
                if head % 2 != 0 || c >= CHAINS {
                    bail!("device returned RX descriptor {head}, not a chain head this driver offered");
                }
                self.rx_posted -= 1;
                let r = self.rx_packet(c, len);
                self.rx_free.push(c);
                r?;
            }
            if self.m.rx.enable_interrupts(&self.m.mem) {
                break;
            }
        }
        if self.rx_posted < CHAINS / 2 {
            self.refill_rx()?;
        }
        self.stats.kicks_saved = self.m.rx.kicks_saved + self.m.tx.kicks_saved;
        Ok(())
    }

    fn rx_packet(&mut self, chain: u16, used_len: u32) -> Result<()> {
        self.stats.rx_packets += 1;
        let at = RX_BUFS_AT + u64::from(chain) * RX_SLOT;
        let mut hb = [0u8; HDR_LEN];
        self.m
            .mem
            .read_slice(&mut hb, GuestAddress(at))
            .context("read RX header")?;
        let h = Hdr::from_bytes(&hb);
        if h.len > RX_BUF || used_len != HDR_LEN as u32 + h.len {
            bail!("RX packet {h:?}: used length {used_len}, want header + payload ({HDR_LEN} + len <= {RX_BUF})");
        }
        if h.src_cid != HOST_CID || h.dst_cid != self.cid || h.type_ != TYPE_STREAM {
            bail!(
                "RX packet {h:?}: not a stream packet from CID {HOST_CID} to CID {}",
                self.cid
            );
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            return self.rx_request(key, &h);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op == OP_RST {
                // The peer's answer to a packet that crossed its own close: Linux drops it
                // (`virtio_transport_reset_no_sock` never answers an RST).
                self.stats.stray_resets += 1;
                return Ok(());
            }
            self.stats.unknown_packets += 1;
            if self.stats.first_unknown.is_none() {
                let ended = self
                    .done
                    .iter()
                    .rev()
                    .find(|r| (r.local_port, r.peer_port) == key)
                    .map(|r| format!("{:?} {:?} before", r.close, r.closed_at.elapsed()));
                self.stats.first_unknown = Some(format!(
                    "{h:?}; connection ended: {}",
                    ended.unwrap_or_else(|| "never open".into())
                ));
            }
            self.ctrl.push_back(Ctrl::Raw(rst_reply(self.cid, &h)));
            return Ok(());
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.waiting_credit && c.credit() > 0 {
            c.waiting_credit = false;
        }
        match h.op {
            OP_RESPONSE => {
                if c.state == State::Connecting {
                    c.state = State::Connected;
                    self.app_step(key);
                } else {
                    bail!("RESPONSE on connection {key:?} in state {:?}", c.state);
                }
            }
            OP_RST => {
                let kind = match c.state {
                    State::Connecting => CloseKind::Refused,
                    State::Closing(_) => CloseKind::Clean,
                    State::Connected
                        if c.unsent() == 0
                            && c.app_done_reading()
                            && c.local_shutdown & SHUTDOWN_SEND != 0 =>
                    {
                        CloseKind::DoneThenReset
                    }
                    State::Connected => CloseKind::Reset,
                };
                self.finish(key, kind);
            }
            OP_SHUTDOWN => {
                c.peer_shutdown |= h.flags & SHUTDOWN_BOTH;
                if c.peer_shutdown == SHUTDOWN_BOTH && !matches!(c.state, State::Closing(_)) {
                    // Nothing is ever left unread here: reset and close, as Linux does.
                    let done = c.unsent() == 0 && c.app_done_reading();
                    let rst = header(self.cid, c, OP_RST, 0, 0);
                    self.ctrl.push_back(Ctrl::Raw(rst));
                    self.finish(
                        key,
                        if done {
                            CloseKind::Clean
                        } else {
                            CloseKind::Reset
                        },
                    );
                } else {
                    self.app_step(key);
                }
            }
            OP_RW => {
                self.rx_data(key, chain, h.len)?;
                self.app_step(key);
            }
            OP_CREDIT_UPDATE => self.app_step(key),
            OP_CREDIT_REQUEST => {
                self.stats.credit_requests_answered += 1;
                self.queue_credit_update(key);
            }
            _ => {
                // virtio_transport_recv_connected drops it (-EINVAL), after the credit update.
                self.stats.invalid_op_packets += 1;
                if self.stats.first_invalid_op.is_none() {
                    let state = self.conns.get(&key).map_or("gone", |c| c.state.name());
                    self.stats.first_invalid_op = Some(format!("{h:?} in state {state}"));
                }
            }
        }
        Ok(())
    }

    fn rx_request(&mut self, key: Key, h: &Hdr) -> Result<()> {
        let Some(app) = self.listeners.get(&h.dst_port).copied() else {
            self.ctrl.push_back(Ctrl::Raw(rst_reply(self.cid, h)));
            return Ok(());
        };
        if self.conns.contains_key(&key) {
            bail!("REQUEST for connection {key:?} that is already open");
        }
        let mut c = Conn::new(key.0, key.1, State::Connected, app);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        self.ctrl.push_back(Ctrl::Conn {
            key,
            op: OP_RESPONSE,
            flags: 0,
        });
        self.app_step(key);
        Ok(())
    }

    /// The application reads the payload at once: checked (or kept for echo), then credit.
    fn rx_data(&mut self, key: Key, chain: u16, len: u32) -> Result<()> {
        let at = RX_BUFS_AT + u64::from(chain) * RX_SLOT + DATA_OFFSET;
        let buf = &mut self.scratch[..len as usize];
        self.m
            .mem
            .read_slice(buf, GuestAddress(at))
            .context("read RX payload")?;
        let c = self.conns.get_mut(&key).expect("caller checked");
        if matches!(c.state, State::Closing(_)) || c.local_shutdown & SHUTDOWN_RCV != 0 {
            // In flight when the guest closed: dropped, as a closed socket would.
            return Ok(());
        }
        if c.peer_shutdown & SHUTDOWN_SEND != 0 {
            bail!("connection {key:?}: data after the peer's SHUTDOWN(SEND)");
        }
        let in_flight = c.fwd_cnt.wrapping_add(len).wrapping_sub(c.last_fwd_cnt);
        if in_flight > BUF_ALLOC {
            self.stats.credit_overrun_bytes += u64::from(in_flight - BUF_ALLOC).min(u64::from(len));
        }
        match c.app.recv {
            Recv::Nothing => {
                bail!("connection {key:?}: {len} bytes for an application that reads nothing")
            }
            Recv::Expect(n) => {
                if c.received + u64::from(len) > n {
                    bail!(
                        "connection {key:?}: {} bytes received, {n} expected",
                        c.received + u64::from(len)
                    );
                }
                let seed = *c
                    .rx_seed
                    .get_or_insert_with(|| Pattern::seed_of_first(buf[0]));
                let want = self.pattern.slice(seed, c.received, len as usize);
                if buf != want {
                    let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    bail!(
                        "connection {key:?}: byte {} differs from the pattern (got {:#x}, want {:#x})",
                        c.received + i as u64,
                        buf[i],
                        want[i]
                    );
                }
            }
            Recv::Echo => {
                if c.echo.len() + buf.len() > ECHO_LIMIT {
                    bail!("connection {key:?}: more than {ECHO_LIMIT} bytes to echo and no credit to send them");
                }
                let was_idle = c.echo.is_empty();
                c.echo.extend(buf.iter());
                if was_idle {
                    self.senders.push_back(key);
                }
            }
        }
        c.received += u64::from(len);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(len);
        c.last_rx_at = Some(Instant::now());
        // virtio_transport_stream_do_dequeue: update the peer once the space it knows of is
        // under one maximal packet.
        let free_space = BUF_ALLOC.saturating_sub(c.fwd_cnt.wrapping_sub(c.last_fwd_cnt));
        if free_space < MAX_PKT {
            self.queue_credit_update(key);
        }
        Ok(())
    }

    fn queue_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.credit_update_queued {
                c.credit_update_queued = true;
                self.ctrl.push_back(Ctrl::Conn {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
        }
    }

    /// What the application does next after something happened on its connection.
    fn app_step(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != State::Connected {
            return;
        }
        if c.unsent() > 0 {
            if !self.senders.contains(&key) {
                self.senders.push_back(key);
            }
            return;
        }
        let sent_all = c.app.recv == Recv::Echo || c.sent == c.app.send;
        if !sent_all {
            return;
        }
        if c.app.half_close && c.local_shutdown & SHUTDOWN_SEND == 0 {
            c.local_shutdown |= SHUTDOWN_SEND;
            self.ctrl.push_back(Ctrl::Conn {
                key,
                op: OP_SHUTDOWN,
                flags: SHUTDOWN_SEND,
            });
        }
        let eof = c.peer_shutdown & SHUTDOWN_SEND != 0;
        let close = match c.app.recv {
            Recv::Nothing => !c.app.half_close || eof,
            Recv::Expect(_) | Recv::Echo => eof,
        };
        if close {
            c.local_shutdown = SHUTDOWN_BOTH;
            c.state = State::Closing(Instant::now());
            self.ctrl.push_back(Ctrl::Conn {
                key,
                op: OP_SHUTDOWN,
                flags: SHUTDOWN_BOTH,
            });
        }
    }

    // ------------------------------------------------------------------------------ TX

    /// `virtio_transport_tx_work`: reclaim sent buffers, re-arm, recheck.
    fn tx_work(&mut self) {
        loop {
            self.m.tx.disable_interrupts(&self.m.mem);
            while let Some((head, _)) = self.m.tx.take_used(&self.m.mem) {
                self.tx_free.push(head / 2);
            }
            if self.m.tx.enable_interrupts(&self.m.mem) {
                break;
            }
        }
    }

    /// Puts one packet in TX buffer `c` and offers it.
    fn put_tx(&mut self, c: u16, h: &Hdr, payload: Option<(u32, u64)>) -> Result<()> {
        let at = TX_BUFS_AT + u64::from(c) * TX_SLOT;
        self.m
            .mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .context("write TX header")?;
        let hdr_desc = Desc {
            addr: at,
            len: HDR_LEN as u32,
            device_writes: false,
        };
        if h.len > 0 {
            if let Some((seed, offset)) = payload {
                let data = self.pattern.slice(seed, offset, h.len as usize);
                self.m
                    .mem
                    .write_slice(data, GuestAddress(at + DATA_OFFSET))
                    .context("write TX payload")?;
            }
            let data_desc = Desc {
                addr: at + DATA_OFFSET,
                len: h.len,
                device_writes: false,
            };
            self.m
                .tx
                .write_chain(&self.m.mem, 2 * c, &[hdr_desc, data_desc]);
        } else {
            self.m.tx.write_chain(&self.m.mem, 2 * c, &[hdr_desc]);
        }
        self.m.tx.offer(&self.m.mem, 2 * c);
        self.stats.tx_packets += 1;
        Ok(())
    }

    /// `virtio_transport_send_pkt_work`: control packets, then data in turn, while TX buffers
    /// last; one kick for the batch.
    fn flush_tx(&mut self) -> Result<()> {
        while let Some(ctrl) = self.ctrl.front().copied() {
            let Some(slot) = self.tx_free.pop() else {
                self.stats.tx_ring_full += 1;
                break;
            };
            self.ctrl.pop_front();
            let h = match ctrl {
                Ctrl::Raw(h) => h,
                Ctrl::Conn { key, op, flags } => {
                    let Some(c) = self.conns.get_mut(&key) else {
                        self.tx_free.push(slot);
                        continue;
                    };
                    c.last_fwd_cnt = c.fwd_cnt;
                    if op == OP_CREDIT_UPDATE {
                        c.credit_update_queued = false;
                        self.stats.credit_updates_sent += 1;
                    }
                    let c = &self.conns[&key];
                    header(self.cid, c, op, flags, 0)
                }
            };
            self.put_tx(slot, &h, None)?;
        }
        // Senders without credit leave the turn (a packet from the peer brings them back), so
        // this ends when every sender is done or blocked, or the TX buffers run out.
        while self.ctrl.is_empty() {
            let Some(key) = self.senders.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get(&key) else {
                continue;
            };
            if c.state != State::Connected || c.unsent() == 0 {
                continue;
            }
            let credit = c.credit();
            if credit == 0 {
                if !c.waiting_credit {
                    self.stats.credit_waits += 1;
                    self.conns.get_mut(&key).expect("present").waiting_credit = true;
                }
                // Back in turn when a credit update arrives (app_step re-adds it).
                continue;
            }
            let Some(slot) = self.tx_free.pop() else {
                self.stats.tx_ring_full += 1;
                self.senders.push_front(key);
                break;
            };
            let len = c.unsent().min(u64::from(MAX_PKT)).min(u64::from(credit)) as u32;
            let h = header(self.cid, c, OP_RW, 0, len);
            let c = self.conns.get_mut(&key).expect("present");
            c.last_fwd_cnt = c.fwd_cnt;
            c.tx_cnt = c.tx_cnt.wrapping_add(len);
            let payload = if c.app.recv == Recv::Echo {
                let bytes: Vec<u8> = c.echo.drain(..len as usize).collect();
                let at = TX_BUFS_AT + u64::from(slot) * TX_SLOT + DATA_OFFSET;
                self.m
                    .mem
                    .write_slice(&bytes, GuestAddress(at))
                    .context("write echoed TX payload")?;
                None
            } else {
                let p = Some((Pattern::to_host_seed(c.host_port()), c.sent));
                c.sent += u64::from(len);
                p
            };
            if c.app.recv == Recv::Echo {
                c.sent += u64::from(len);
            }
            self.put_tx(slot, &h, payload)?;
            if self.conns[&key].unsent() > 0 {
                self.senders.push_back(key);
            } else {
                self.app_step(key);
            }
            // A close or shutdown the application now queued goes out in this batch.
            if !self.ctrl.is_empty() {
                return self.flush_tx();
            }
        }
        let before = self.m.tx.kicks;
        self.m.tx.kick(&self.m.mem)?;
        self.stats.tx_kicks += self.m.tx.kicks - before;
        self.stats.kicks_saved = self.m.rx.kicks_saved + self.m.tx.kicks_saved;
        Ok(())
    }

    /// Takes the reports of the connections that ended so far.
    pub fn take_done(&mut self) -> Vec<ConnReport> {
        std::mem::take(&mut self.done)
    }
}
