//! The vsock device model of one VM, independent of vhost-user.
//!
//! [`Device`] holds the connection table of one guest and its host side: the hybrid vsock Unix
//! sockets (`uds_path` for host-initiated connections, `<uds_path>_<port>` for guest-initiated
//! ones). It is driven by three calls:
//!
//! - [`Device::on_guest_packet`] with each packet the guest put on its TX queue;
//! - [`Device::next_rx`] for each packet to give the guest, while [`Device::has_rx`];
//! - [`Device::handle_host_events`] when its epoll fd ([`Device::epoll_fd`]) is readable.
//!
//! It never touches guest memory: the vhost-user adapter ([`crate::backend`]) turns descriptor
//! chains into [`Header`]s and payload slices and back.
//!
//! # Flow control
//!
//! As the virtio spec's vsock section says: each side advertises `buf_alloc` (its receive buffer
//! for the connection) and `fwd_cnt` (bytes it has consumed) in every packet header. A sender may
//! have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. This device gives the
//! guest `buf_alloc = tx_buffer_size` per connection and counts as consumed what the host socket
//! accepted; data the host socket does not take at once is buffered, and that buffer is bounded by
//! the credit: a guest that sends more is in violation and its connection is reset. A seqpacket
//! connection's `buf_alloc` is also no more than the longest message its host socket takes whole
//! ([`MAX_GUEST_SEQ_MSG`], `fit_seq_sndbuf`): a Linux guest refuses a longer message itself
//! (`EMSGSIZE`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmlink_proto::hybrid::{
    host_listener_path, ConnectReply, ConnectRequest, Handshake, MAX_LINE_LEN,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::counters::{should_log, Counter, Counters};
use crate::router::{ForwardError, Router};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_TYPE_SEQPACKET`.
pub const TYPE_SEQPACKET: u16 = 2;

/// `VIRTIO_VSOCK_OP_REQUEST`.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`.
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_SEQ_EOM`: the packet ends a seqpacket message.
pub const SEQ_EOM: u32 = 1;
/// `VIRTIO_VSOCK_SEQ_EOR`: the message ends a record (`MSG_EOR`).
pub const SEQ_EOR: u32 = 2;

/// Host bytes read ahead per stream connection, at most (64 KiB): one read fills several guest
/// RX buffers. A seqpacket connection reads one whole message instead (up to
/// [`MAX_HOST_SEQ_MSG`]), and lets go of room beyond this once the message is sent.
const STAGE: usize = 64 * 1024;

/// Largest payload of one packet, in either direction (the Linux driver's 64 KiB).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// First host port handed out to host-initiated connections (the guest sees it as its peer's
/// port); Firecracker starts at the same place.
const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_INBOX: u64 = 2;
const TOKEN_SEQ_LISTENER: u64 = 3;

/// Largest seqpacket message taken from a host socket (256 KiB); a longer one resets the
/// connection rather than being cut.
pub const MAX_HOST_SEQ_MSG: usize = 256 * 1024;

/// Largest seqpacket message toward the host (4 MiB), whatever `tx_buffer_size`: a Linux Unix
/// socket puts all but 68 KiB of a message in one allocation, and refuses (`ENOBUFS`) a message
/// over its allocator's bound (`KMALLOC_MAX_SIZE`, 4 MiB with 4 KiB pages; 8 MiB was refused on
/// Linux 6.18 with `SO_SNDBUF` room for it). A seqpacket connection's `buf_alloc` is at most this.
pub const MAX_GUEST_SEQ_MSG: u32 = 4 << 20;

/// Linux refuses a Unix seqpacket (or datagram) message longer than the sending socket's
/// `SO_SNDBUF` less this (`EMSGSIZE`).
const UNIX_MSG_OVERHEAD: usize = 32;

/// A seqpacket connection keeps at most `tx_buffer_size / SEQ_MSG_CHARGE` whole guest messages
/// waiting for its host socket ([`seq_msg_bound`]).
pub const SEQ_MSG_CHARGE: u32 = 4;

/// The most whole guest messages a seqpacket connection keeps waiting for its host socket:
/// `tx_buffer_size / 4` (65 536 with the default 256 KiB). The credit bounds their bytes; this
/// bounds their bookkeeping (4 bytes each, `tx_buffer_size` at most) for messages under 4 bytes
/// on average. A guest that queues more, which takes such tiny messages and a host reader that
/// falls that far behind, has its connection reset (`seqpacket_limit`).
pub fn seq_msg_bound(tx_buffer_size: u32) -> usize {
    (tx_buffer_size / SEQ_MSG_CHARGE).max(1) as usize
}

/// Where host clients connect for seqpacket connections to the guest: `<uds_path>_seqpacket`,
/// a `SOCK_SEQPACKET` Unix socket. The `CONNECT <port>\n` line and the `OK <port>\n` reply are
/// one message each; every later message is one guest seqpacket message.
pub fn seqpacket_listener_path(uds_path: &Path) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push("_seqpacket");
    PathBuf::from(s)
}
const FIRST_STREAM_TOKEN: u64 = 16;

/// A virtio-vsock packet header (`struct virtio_vsock_hdr`), as plain fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type: [`TYPE_STREAM`] or [`TYPE_SEQPACKET`].
    pub type_: u16,
    /// Operation: one of the `OP_*` constants.
    pub op: u16,
    /// Operation flags (shutdown flags, seqpacket EOM/EOR).
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed on this connection.
    pub fwd_cnt: u32,
}

/// The size of `struct virtio_vsock_hdr` on the wire.
pub const HEADER_LEN: usize = 44;

impl Header {
    /// The wire form (little-endian, as in the virtio spec).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header from its wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// How one VM's device behaves, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The hybrid vsock Unix socket: host clients connect here and send `CONNECT <port>\n`;
    /// guest connections to host port `P` go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    /// The receive buffer given to the guest per connection (`buf_alloc`): the most data this
    /// device buffers per connection toward the host.
    pub tx_buffer_size: u32,
    /// The most connections the VM may have at once (both directions, including those being
    /// set up). More are refused with RST (guest) or closed (host).
    pub max_connections: usize,
    /// The most host clients that may be in their `CONNECT` handshake at once.
    pub max_handshakes: usize,
    /// How long a host client has to send its `CONNECT` line.
    pub handshake_timeout: Duration,
    /// How long the guest has to accept a host-initiated connection.
    pub connect_timeout: Duration,
    /// How long a clean close waits for the guest's RST (default [`CLOSE_TIMEOUT`]).
    pub close_timeout: Duration,
    /// How often timeouts are checked and unannounced credit is sent (default 500 ms).
    pub tick: Duration,
}

impl DeviceConfig {
    /// A config with the default bounds.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Self {
        DeviceConfig {
            guest_cid,
            uds_path,
            tx_buffer_size: DEFAULT_TX_BUFFER_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: vmlink_proto::hybrid::DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(10),
            close_timeout: CLOSE_TIMEOUT,
            tick: Duration::from_millis(500),
        }
    }
}

/// Default per-connection buffer toward the host (256 KiB).
pub const DEFAULT_TX_BUFFER_SIZE: u32 = 256 * 1024;
/// Default bound on connections per VM.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default bound on host clients in their handshake per VM.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The hybrid vsock socket could not be bound.
    #[error("cannot listen on uds-path {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// epoll or timerfd setup failed.
    #[error("cannot set up the event loop: {0}")]
    Setup(#[source] io::Error),
}

/// A connection's key: the host-side port and the guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The port on the host side (CID 2).
    pub host_port: u32,
    /// The port on the guest side.
    pub guest_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting {
        since: Instant,
    },
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    type_: u16,
    /// The credit given to the guest (`buf_alloc` in every header): `tx_buffer_size`, or for a
    /// seqpacket connection at most the longest message its host socket takes whole.
    buf_alloc: u32,
    // Guest to host.
    rx_cnt: u32,
    fwd_cnt: u32,
    reported_fwd_cnt: u32,
    /// Guest bytes waiting for the host socket. Seqpacket: whole messages back to back (their
    /// lengths in `msg_lens`), then the `cur_len` bytes of the one being assembled.
    to_host: VecDeque<u8>,
    /// Seqpacket: the lengths of the whole messages at the front of `to_host`; at most
    /// [`seq_msg_bound`] of them.
    msg_lens: VecDeque<u32>,
    cur_len: u32,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    host_write_shut: bool,
    host_writable: bool,
    /// Whether epoll watches the host socket for writability: only while bytes wait for it, so
    /// that a host reader's every read does not wake the device.
    out_watched: bool,
    // Host to guest.
    from_host: Vec<u8>,
    /// The unsent part of `from_host` is `from_pos..from_end`.
    from_pos: usize,
    from_end: usize,
    /// Seqpacket: `from_host` holds (the rest of) one host message.
    seq_msg: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    host_readable: bool,
    /// The host socket reported a hang-up: read it until end-of-file even after a short read.
    host_hup: bool,
    host_eof: bool,
    eof_sent: bool,
    in_rx_queue: bool,
    /// In `Device::pending_flush`: small guest packets wait in `to_host` for the end of the
    /// TX pass.
    flush_queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, type_: u16, buf_alloc: u32) -> Self {
        Conn {
            stream,
            token,
            state,
            type_,
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            to_host: VecDeque::new(),
            msg_lens: VecDeque::new(),
            cur_len: 0,
            guest_shut_send: false,
            guest_shut_recv: false,
            host_write_shut: false,
            host_writable: true,
            out_watched: false,
            from_host: Vec::new(),
            from_pos: 0,
            from_end: 0,
            seq_msg: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            host_readable: true,
            host_hup: false,
            host_eof: false,
            eof_sent: false,
            in_rx_queue: false,
            flush_queued: false,
        }
    }

    /// Whether everything the guest sent has reached the host socket (for seqpacket: every
    /// whole message; the bytes of a message never ended are never sent).
    fn to_host_empty(&self) -> bool {
        if self.type_ == TYPE_SEQPACKET {
            self.msg_lens.is_empty()
        } else {
            self.to_host.is_empty()
        }
    }

    /// Whether host bytes wait in `from_host`.
    fn has_staged(&self) -> bool {
        self.from_pos < self.from_end
    }

    /// Bytes the guest can still take.
    fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether this connection may have data for the guest.
    fn wants_rx(&self) -> bool {
        self.state == State::Established
            && !self.guest_shut_recv
            && !self.eof_sent
            && self.peer_free() > 0
            && (self.has_staged() || self.host_readable)
    }
}

#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    type_: u16,
    handshake: Handshake<ConnectRequest>,
}

#[derive(Debug, Clone, Copy)]
enum Token {
    Client,
    Conn(ConnKey),
}

/// What closes a connection, for logs.
#[derive(Debug, Clone, Copy)]
enum Why {
    GuestRst,
    Violation,
    HostError,
    Done,
    Timeout,
    GuestRestart,
}

/// One VM's vsock device: its connections and its hybrid host side.
#[derive(Debug)]
pub struct Device {
    cfg: DeviceConfig,
    epoll: Epoll,
    listener: UnixListener,
    seq_listener: UnixListener,
    seq_buf: Vec<u8>,
    timer: TimerFd,
    conns: HashMap<ConnKey, Conn>,
    clients: HashMap<u64, PendingClient>,
    tokens: HashMap<u64, Token>,
    next_token: u64,
    next_host_port: u32,
    ctrl: VecDeque<Header>,
    /// Connections that may have data for the guest, in round-robin order: each open
    /// connection at most once (`Conn::in_rx_queue`), a closed one never.
    data_ready: VecDeque<ConnKey>,
    /// Connections whose small guest packets wait in `to_host` ([`Device::flush_pending`]).
    pending_flush: Vec<ConnKey>,
    /// Connections closed cleanly by this side: both directions finished, the host socket is
    /// gone, and a SHUTDOWN (both flags) went to the guest, whose RST ends the entry, as the
    /// virtio spec's clean disconnect has it. Entries older than [`CLOSE_TIMEOUT`] get an RST
    /// instead ([`DeviceConfig::close_timeout`]). At most `max-connections` entries; past that
    /// the RST goes at once.
    closing: HashMap<ConnKey, (Instant, u16)>,
    counters: Arc<Counters>,
    router: Option<Arc<Router>>,
    /// Whether the next RX buffer goes to the inbox (packets from other VMs) before the host
    /// connections: the two take turns, so a VM that keeps sending to this one cannot hold up
    /// its host traffic, nor the host the other VMs'.
    inbox_first: bool,
    /// The host listeners not watched since `accept` failed (the process out of file
    /// descriptors, most often), by whether seqpacket: a level-triggered listener with a client
    /// waiting would wake the device again at once, forever. Watched again on the next tick
    /// ([`Device::sweep`]) or when a connection or a host client is closed
    /// ([`Device::resume_listeners`]).
    paused_listeners: [bool; 2],
    /// Tests: `accept` fails with this errno.
    #[cfg(test)]
    accept_error: Option<i32>,
}

/// Guest packets with less payload than this are gathered per connection during a TX pass and
/// written to the host socket once at its end ([`Device::flush_pending`]): a guest writing
/// 4 KiB at a time costs one `write(2)` per pass, not one per packet. Bigger packets are
/// written at once, straight from the TX buffer, when nothing waits before them.
pub const COALESCE_BELOW: usize = 16 * 1024;

/// How long a clean close waits for the guest's RST before it sends one itself (Linux's
/// `VSOCK_CLOSE_TIMEOUT`).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// A device is dropped when its VMM goes away, and its connections with it: they count as
/// closed, so that `connections_opened - connections_closed` is the number open.
impl Drop for Device {
    fn drop(&mut self) {
        self.counters
            .add(Counter::connections_closed, self.conns.len() as u64);
    }
}

/// Bound on queued control packets toward the guest: a guest that floods bogus packets and
/// gives no RX buffers cannot grow this without bound.
fn ctrl_bound(cfg: &DeviceConfig) -> usize {
    cfg.max_connections * 4 + 1024
}

impl Device {
    /// Binds `cfg.uds_path` (replacing a stale socket there) and sets up the event loop.
    pub fn new(cfg: DeviceConfig, counters: Arc<Counters>) -> Result<Self, DeviceError> {
        Self::with_router(cfg, counters, None)
    }

    /// Like [`Device::new`], with VM-to-VM routing through `router` (which must know this VM's
    /// CID to deliver packets to it). Packets left in this VM's inbox are dropped.
    pub fn with_router(
        cfg: DeviceConfig,
        counters: Arc<Counters>,
        router: Option<Arc<Router>>,
    ) -> Result<Self, DeviceError> {
        let path = cfg.uds_path.clone();
        remove_stale_socket(&path);
        let listener = UnixListener::bind(&path).map_err(|source| DeviceError::Bind {
            path: path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| DeviceError::Bind {
                path: path.clone(),
                source,
            })?;
        let seq_path = seqpacket_listener_path(&path);
        remove_stale_socket(&seq_path);
        let seq_listener = listen_seqpacket(&seq_path).map_err(|source| DeviceError::Bind {
            path: seq_path,
            source,
        })?;
        let epoll = Epoll::new().map_err(DeviceError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                seq_listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SEQ_LISTENER),
            )
            .map_err(DeviceError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(DeviceError::Setup)?;
        let mut timer = TimerFd::new().map_err(|e| DeviceError::Setup(e.into()))?;
        let tick = cfg.tick;
        timer
            .reset(tick, Some(tick))
            .map_err(|e| DeviceError::Setup(e.into()))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(DeviceError::Setup)?;
        if let Some(inbox) = router.as_ref().and_then(|r| r.inbox(cfg.guest_cid)) {
            inbox.clear();
            epoll
                .ctl(
                    ControlOperation::Add,
                    inbox.fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_INBOX),
                )
                .map_err(DeviceError::Setup)?;
        }
        Ok(Device {
            cfg,
            epoll,
            listener,
            seq_listener,
            seq_buf: vec![0; MAX_HOST_SEQ_MSG],
            timer,
            conns: HashMap::new(),
            clients: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            ctrl: VecDeque::new(),
            data_ready: VecDeque::new(),
            inbox_first: false,
            pending_flush: Vec::new(),
            closing: HashMap::new(),
            counters,
            router,
            paused_listeners: [false; 2],
            #[cfg(test)]
            accept_error: None,
        })
    }

    /// The device's config.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// The VM's counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The fd to watch for readability: then call [`Device::handle_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of open connections (both directions, including those being set up).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of host clients still in their `CONNECT` handshake.
    pub fn handshake_count(&self) -> usize {
        self.clients.len()
    }

    /// Bytes buffered toward the host over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len()).sum()
    }

    /// Whether [`Device::next_rx`] may have a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty()
            || !self.data_ready.is_empty()
            || self.inbox().is_some_and(|i| !i.is_empty())
    }

    fn inbox(&self) -> Option<&Arc<crate::router::Inbox>> {
        self.router
            .as_ref()
            .and_then(|r| r.inbox(self.cfg.guest_cid))
    }

    /// The guest's driver started afresh (the guest rebooted, or reset its vsock device): the
    /// connections of its previous boot are gone on its side. Frees them (their host sockets are
    /// closed, so host clients see end-of-file), and drops what waited for the old driver
    /// (control packets, the RX schedule, clean closes waiting for its RST). Host connections
    /// whose REQUEST was never given to the guest are kept, REQUEST and all: the new driver gets
    /// it. Packets from other VMs stay in the inbox; the new guest answers those of unknown
    /// connections with RST, which resets the other VM's half. Returns how many connections
    /// were freed.
    pub fn guest_restarted(&mut self) -> usize {
        let request_key = |h: &Header| ConnKey {
            host_port: h.src_port,
            guest_port: h.dst_port,
        };
        let undelivered: HashSet<ConnKey> = self
            .ctrl
            .iter()
            .filter(|h| h.op == OP_REQUEST)
            .map(request_key)
            .collect();
        let stale: Vec<ConnKey> = self
            .conns
            .keys()
            .filter(|k| !undelivered.contains(k))
            .copied()
            .collect();
        for key in &stale {
            self.close(*key, Why::GuestRestart, false);
        }
        let conns = &self.conns;
        self.ctrl
            .retain(|h| h.op == OP_REQUEST && conns.contains_key(&request_key(h)));
        self.data_ready.clear();
        self.pending_flush.clear();
        for conn in self.conns.values_mut() {
            conn.in_rx_queue = false;
            conn.flush_queued = false;
        }
        self.closing.clear();
        if !stale.is_empty() {
            info!(
                cid = self.cfg.guest_cid,
                "the guest restarted its vsock device: freed {} connections of its previous boot",
                stale.len()
            );
        }
        stale.len()
    }

    /// Records an RX descriptor chain (a buffer the guest gave) that could not be parsed. Not
    /// a packet from the guest: `tx_packets` does not count it.
    pub fn count_malformed_rx(&self, what: &dyn std::fmt::Display) {
        let n = self.counters.inc(Counter::malformed_rx_descriptors);
        if should_log(n) {
            info!(
                cid = self.cfg.guest_cid,
                "returned a malformed RX descriptor chain unused ({n} so far): {what}"
            );
        }
    }

    /// Records a TX descriptor chain that could not be parsed.
    pub fn count_malformed(&self, what: &dyn std::fmt::Display) {
        self.counters.inc(Counter::tx_packets);
        let n = self.counters.inc(Counter::malformed_descriptors);
        if should_log(n) {
            info!(
                cid = self.cfg.guest_cid,
                "dropped malformed TX descriptor chain ({n} so far): {what}"
            );
        }
    }

    // ---------------------------------------------------------------- guest to device

    /// Handles one packet from the guest's TX queue. `data` is its payload (`hdr.len` bytes).
    /// Stream payloads under [`COALESCE_BELOW`] bytes may wait for [`Device::flush_pending`].
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        self.counters.inc(Counter::tx_packets);
        let cid = self.cfg.guest_cid;
        if hdr.src_cid != cid {
            let n = self.counters.inc(Counter::spoofed_cid);
            if should_log(n) {
                info!(
                    cid,
                    "dropped packet with spoofed source CID {} ({n} so far)", hdr.src_cid
                );
            }
            return;
        }
        if data.len() != hdr.len as usize {
            self.bad(hdr, "payload length differs from the header's len");
            return;
        }
        if hdr.dst_cid != HOST_CID {
            match self.router.as_ref().map(|r| r.forward(hdr, data)) {
                Some(Ok(())) => {
                    self.counters.inc(Counter::forwarded);
                    return;
                }
                Some(Err(ForwardError::Full)) => {
                    let n = self.counters.inc(Counter::forward_dropped);
                    if should_log(n) {
                        info!(cid, "VM {} does not take its packets: dropped one, reset the connection on both sides ({n} so far)", hdr.dst_cid);
                    }
                    // Both halves: the sender's here, the receiver's through its inbox.
                    if let Some(r) = &self.router {
                        r.reset_receiver(hdr);
                    }
                    self.reply_rst(hdr);
                    return;
                }
                Some(Err(ForwardError::Unreachable)) | None => {}
            }
            let n = self.counters.inc(Counter::unroutable);
            if should_log(n) {
                info!(
                    cid,
                    "dropped packet to unreachable CID {} ({n} so far)", hdr.dst_cid
                );
            }
            if hdr.op == OP_REQUEST {
                self.reply_rst(hdr);
            }
            return;
        }
        if hdr.type_ != TYPE_STREAM && hdr.type_ != TYPE_SEQPACKET {
            self.bad(hdr, "unsupported socket type");
            return;
        }
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        match hdr.op {
            OP_REQUEST => self.guest_request(key, hdr),
            OP_RST => {
                if self.conns.contains_key(&key) {
                    self.close(key, Why::GuestRst, false);
                } else {
                    // The answer to a clean close's SHUTDOWN (or nothing we know of).
                    self.closing.remove(&key);
                }
            }
            op @ (OP_RESPONSE | OP_SHUTDOWN | OP_RW | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST) => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    // Nothing to talk to: tell the guest so that it frees its side.
                    self.reply_rst(hdr);
                    return;
                };
                if conn.type_ != hdr.type_ {
                    self.bad(hdr, "socket type differs from the connection's");
                    return;
                }
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                match op {
                    OP_RESPONSE => self.guest_response(key, hdr),
                    OP_SHUTDOWN => self.guest_shutdown(key, hdr.flags),
                    OP_RW => self.guest_data(key, hdr, data),
                    OP_CREDIT_REQUEST => self.push_ctrl_for(key, OP_CREDIT_UPDATE, 0),
                    _ => {}
                }
                self.schedule(key);
            }
            _ => self.bad(hdr, "unknown operation"),
        }
    }

    fn bad(&mut self, hdr: &Header, what: &str) {
        let n = self.counters.inc(Counter::bad_packets);
        if should_log(n) {
            info!(
                cid = self.cfg.guest_cid,
                "bad packet from guest ({n} so far): {what}: op {} type {} len {} ports {}->{}",
                hdr.op,
                hdr.type_,
                hdr.len,
                hdr.src_port,
                hdr.dst_port
            );
        }
        if hdr.op != OP_RST {
            let key = ConnKey {
                host_port: hdr.dst_port,
                guest_port: hdr.src_port,
            };
            if hdr.dst_cid == HOST_CID && self.conns.contains_key(&key) {
                self.close(key, Why::Violation, true);
            } else {
                self.reply_rst(hdr);
            }
        }
    }

    /// Whether the VM holds its bound of connections; if so, counts (`connection_limit`) and
    /// logs (rate-limited) that `refused` was refused.
    fn at_connection_limit(&self, refused: std::fmt::Arguments<'_>) -> bool {
        if self.conns.len() < self.cfg.max_connections {
            return false;
        }
        let n = self.counters.inc(Counter::connection_limit);
        if should_log(n) {
            info!(
                cid = self.cfg.guest_cid,
                "refused {refused}: the VM is at its bound of {} connections ({n} so far)",
                self.cfg.max_connections
            );
        }
        true
    }

    fn guest_request(&mut self, key: ConnKey, hdr: &Header) {
        // A guest that reuses the port of a connection closing cleanly has let go of it.
        self.closing.remove(&key);
        if self.conns.contains_key(&key) {
            self.bad(hdr, "request for a connection that exists");
            return;
        }
        if self.at_connection_limit(format_args!("guest connection to port {}", key.host_port)) {
            self.reply_rst(hdr);
            return;
        }
        let path = host_listener_path(&self.cfg.uds_path, key.host_port);
        let stream = match connect_nonblocking(&path, hdr.type_ == TYPE_SEQPACKET) {
            Ok(s) => s,
            Err(e) => {
                self.counters.inc(Counter::refused);
                debug!(
                    cid = self.cfg.guest_cid,
                    "guest connection to host port {} refused: {}: {e}",
                    key.host_port,
                    path.display()
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let token = self.alloc_token();
        if let Err(e) = self.register(&stream, token) {
            warn!("cannot watch {}: {e}", path.display());
            self.reply_rst(hdr);
            return;
        }
        let buf_alloc = self.buf_alloc_for(&stream, hdr.type_);
        let mut conn = Conn::new(stream, token, State::Established, hdr.type_, buf_alloc);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, conn);
        self.tokens.insert(token, Token::Conn(key));
        self.counters.inc(Counter::connections_opened);
        debug!(
            cid = self.cfg.guest_cid,
            "guest port {} connected to {}",
            key.guest_port,
            path.display()
        );
        self.push_ctrl_for(key, OP_RESPONSE, 0);
    }

    fn guest_response(&mut self, key: ConnKey, hdr: &Header) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == State::Established {
            // The guest's own header: `bad` frees this connection and resets it.
            self.bad(hdr, "response on an established connection");
            return;
        }
        conn.state = State::Established;
        let line = ConnectReply {
            port: key.host_port,
        }
        .encode();
        // A fresh socket's buffer always has room for these few bytes; anything else means the
        // client is gone.
        match conn.stream.write(&line) {
            Ok(n) if n == line.len() => {}
            Ok(_) | Err(_) => {
                self.close(key, Why::HostError, true);
                return;
            }
        }
        debug!(
            cid = self.cfg.guest_cid,
            "host connection to guest port {} accepted", key.guest_port
        );
    }

    fn guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if flags & SHUTDOWN_SEND != 0 {
            conn.guest_shut_send = true;
        }
        if flags & SHUTDOWN_RCV != 0 {
            conn.guest_shut_recv = true;
        }
        self.flush(key);
    }

    fn guest_data(&mut self, key: ConnKey, hdr: &Header, data: &[u8]) {
        let msg_bound = seq_msg_bound(self.cfg.tx_buffer_size);
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let buf_alloc = conn.buf_alloc;
        if conn.state != State::Established || conn.guest_shut_send {
            let hdr = *hdr;
            self.bad(&hdr, "data on a connection not open for guest data");
            return;
        }
        let used = conn.rx_cnt.wrapping_sub(conn.fwd_cnt);
        let free = buf_alloc.saturating_sub(used);
        if data.len() as u64 > u64::from(free) {
            let n = self.counters.inc(Counter::credit_violations);
            if should_log(n) {
                info!(
                    cid = self.cfg.guest_cid,
                    "guest port {} sent {} bytes with {free} bytes of credit: connection reset ({n} so far)",
                    key.guest_port,
                    data.len()
                );
            }
            self.close(key, Why::Violation, true);
            return;
        }
        self.counters.add(Counter::tx_bytes, data.len() as u64);
        conn.rx_cnt = conn.rx_cnt.wrapping_add(data.len() as u32);
        if conn.type_ == TYPE_SEQPACKET {
            // A message goes to the host socket whole, once its last packet (EOM) is here. The
            // credit check above bounds the bytes waiting by the connection's buf_alloc, which
            // is no more than one message the host socket takes.
            extend_within(&mut conn.to_host, data, buf_alloc as usize);
            conn.cur_len = conn.cur_len.wrapping_add(data.len() as u32);
            if hdr.flags & SEQ_EOM != 0 {
                let len = std::mem::take(&mut conn.cur_len);
                if len == 0 {
                    // An empty message would reach a host SOCK_SEQPACKET reader as end-of-file
                    // (recv returns 0 for both), and it costs no credit: dropped, counted. A
                    // Linux guest never sends one (its transport sends no empty RW packet).
                    let n = self.counters.inc(Counter::empty_messages);
                    if should_log(n) {
                        info!(
                            cid = self.cfg.guest_cid,
                            "guest port {} sent an empty seqpacket message: dropped ({n} so far)",
                            key.guest_port
                        );
                    }
                } else if conn.msg_lens.len() >= msg_bound {
                    let n = self.counters.inc(Counter::seqpacket_limit);
                    if should_log(n) {
                        info!(
                            cid = self.cfg.guest_cid,
                            "guest port {} has {} messages waiting for its host socket: connection reset ({n} so far)",
                            key.guest_port,
                            conn.msg_lens.len()
                        );
                    }
                    self.close(key, Why::Violation, true);
                    return;
                } else {
                    extend_within(&mut conn.msg_lens, &[len], msg_bound);
                }
            }
            self.flush(key);
            return;
        }
        let mut rest = data;
        if data.len() >= COALESCE_BELOW && conn.to_host.is_empty() && conn.host_writable {
            match write_some(&mut conn.stream, rest) {
                Ok(n) => {
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                    rest = &rest[n..];
                    if !rest.is_empty() {
                        conn.host_writable = false;
                    }
                }
                Err(e) => {
                    debug!("host side of guest port {} failed: {e}", key.guest_port);
                    self.close(key, Why::HostError, true);
                    return;
                }
            }
        }
        extend_within(&mut conn.to_host, rest, buf_alloc as usize);
        if conn.host_writable && !conn.to_host.is_empty() && !conn.flush_queued {
            // Small packets: written with whatever else this TX pass brings.
            conn.flush_queued = true;
            self.pending_flush.push(key);
        }
        self.watch_writable(key);
        self.maybe_credit_update(key);
    }

    /// Writes what small guest packets left in `to_host` during a TX pass
    /// ([`COALESCE_BELOW`]). [`crate::backend::drain_tx`] calls it at the end of every pass;
    /// a caller of [`Device::on_guest_packet`] must call it after each batch of packets.
    pub fn flush_pending(&mut self) {
        for key in std::mem::take(&mut self.pending_flush) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.flush_queued = false;
                self.flush(key);
            }
        }
    }

    /// Watches the host socket of `key` for writability exactly while guest bytes wait for it.
    /// Adding the watch reports a socket that is writable already (epoll looks at the socket's
    /// state on `EPOLL_CTL_MOD`), so no wake-up is lost.
    fn watch_writable(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = !conn.host_writable;
        if want == conn.out_watched {
            return;
        }
        match self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(stream_events(want), conn.token),
        ) {
            Ok(()) => conn.out_watched = want,
            Err(e) => {
                warn!("cannot watch a host socket: {e}");
                self.close(key, Why::HostError, true);
            }
        }
    }

    /// Writes buffered guest data to the host socket, then applies a pending shutdown.
    fn flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while conn.type_ == TYPE_SEQPACKET && conn.host_writable {
            let Some(&len) = conn.msg_lens.front() else {
                break;
            };
            let len = len as usize;
            let (a, b) = conn.to_host.as_slices();
            let (a, b) = if a.len() >= len {
                (&a[..len], &b[..0])
            } else {
                (a, &b[..len - a.len()])
            };
            // One message per write: a seqpacket socket takes it whole or not at all.
            match write_some_vectored(&mut conn.stream, a, b) {
                Ok(0) => conn.host_writable = false,
                Ok(_) => {
                    conn.to_host.drain(..len);
                    conn.msg_lens.pop_front();
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(len as u32);
                }
                Err(e) => {
                    debug!("host side of guest port {} failed: {e}", key.guest_port);
                    self.close(key, Why::HostError, true);
                    return;
                }
            }
        }
        while conn.type_ == TYPE_STREAM && !conn.to_host.is_empty() && conn.host_writable {
            let (a, b) = conn.to_host.as_slices();
            match write_some_vectored(&mut conn.stream, a, b) {
                Ok(0) => conn.host_writable = false,
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) => {
                    debug!("host side of guest port {} failed: {e}", key.guest_port);
                    self.close(key, Why::HostError, true);
                    return;
                }
            }
        }
        if conn.to_host_empty() && conn.guest_shut_send && !conn.host_write_shut {
            // The guest's SHUT_WR reaches the host as end-of-file; the other direction stays open.
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.host_write_shut = true;
        }
        if conn.to_host_empty() && conn.guest_shut_send && conn.guest_shut_recv {
            // The guest closed its socket: all its data is delivered.
            self.close(key, Why::Done, true);
            return;
        }
        if conn.host_write_shut && conn.eof_sent {
            // Both directions are finished.
            self.close(key, Why::Done, true);
            return;
        }
        self.watch_writable(key);
        self.maybe_credit_update(key);
    }

    /// Tells the guest about freed buffer space before it can run out.
    fn maybe_credit_update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let buf = conn.buf_alloc;
        // The credit the guest believes it has, from the last fwd_cnt it was told. Update it
        // only once that falls below half the buffer: the guest never runs dry while the host
        // keeps up, and a stream costs one update per half buffer, not one per packet. Linux
        // also stops at its own buffer size (the buf_alloc it advertises), whatever ours is, so
        // the smaller of the two counts.
        let buf = buf.min(conn.peer_buf_alloc.max(1));
        let believed_free = buf.saturating_sub(conn.rx_cnt.wrapping_sub(conn.reported_fwd_cnt));
        let freed = conn.fwd_cnt.wrapping_sub(conn.reported_fwd_cnt);
        if freed > 0 && believed_free < buf / 2 {
            self.push_ctrl_for(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rx_queue && conn.wants_rx() {
                conn.in_rx_queue = true;
                self.data_ready.push_back(key);
            }
        }
    }

    // ---------------------------------------------------------------- device to guest

    /// The next packet for the guest: returns its header and writes its payload (`len` bytes)
    /// to the front of `buf`; the payload is at most `buf.len()` bytes. `None` when there is
    /// nothing to send now.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<Header> {
        let room = buf.len();
        self.next_rx_with(room, &mut |data: &[u8]| {
            buf[..data.len()].copy_from_slice(data)
        })
    }

    /// [`Device::next_rx`] without a buffer of its own: the payload (at most `room` bytes) is
    /// handed to `write`, once, before the header is returned, so that the caller can copy it
    /// straight into the guest's RX buffer.
    pub fn next_rx_with(&mut self, room: usize, write: &mut dyn FnMut(&[u8])) -> Option<Header> {
        if let Some(mut hdr) = self.ctrl.pop_front() {
            // Control packets carry the freshest credit of their connection.
            let key = ConnKey {
                host_port: hdr.src_port,
                guest_port: hdr.dst_port,
            };
            if let Some(conn) = self.conns.get_mut(&key) {
                hdr.fwd_cnt = conn.fwd_cnt;
                conn.reported_fwd_cnt = conn.fwd_cnt;
            }
            self.counters.inc(Counter::rx_packets);
            return Some(hdr);
        }
        if room == 0 {
            return None;
        }
        let inbox_first = self.inbox_first;
        self.inbox_first = !inbox_first;
        if inbox_first {
            if let Some(hdr) = self.next_from_inbox(room, write) {
                return Some(hdr);
            }
        }
        while let Some(key) = self.data_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            if !conn.wants_rx() {
                continue;
            }
            let room = (conn.peer_free() as usize).min(room).min(MAX_PKT_DATA);
            if !conn.has_staged() && !conn.host_eof {
                // Stage up to 64 KiB (or one seqpacket message) with one read: the guest's RX
                // buffers are often 4 KiB, and one read per buffer would cost a syscall each.
                let want = (conn.peer_free() as usize).min(STAGE);
                let read = if conn.type_ == TYPE_SEQPACKET {
                    recv_message(&conn.stream, &mut self.seq_buf).inspect(|&n| {
                        conn.from_host.clear();
                        conn.from_host.extend_from_slice(&self.seq_buf[..n]);
                    })
                } else {
                    if conn.from_host.len() < STAGE {
                        conn.from_host.resize(STAGE, 0);
                    }
                    conn.stream.read(&mut conn.from_host[..want])
                };
                match read {
                    Ok(0) => conn.host_eof = true,
                    Ok(n) => {
                        conn.from_pos = 0;
                        conn.from_end = n;
                        conn.seq_msg = conn.type_ == TYPE_SEQPACKET;
                        // A stream read that did not fill what was asked emptied the socket:
                        // the edge-triggered watch reports the next bytes (or the hang-up), so
                        // the read that would only say EAGAIN is saved. After a hang-up was
                        // seen, read on to end-of-file.
                        if conn.type_ == TYPE_STREAM && n < want && !conn.host_hup {
                            conn.host_readable = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        conn.in_rx_queue = true;
                        self.data_ready.push_back(key);
                        continue;
                    }
                    Err(e) => {
                        debug!(
                            cid = self.cfg.guest_cid,
                            "host side of guest port {}: {e}; connection reset", key.guest_port
                        );
                        self.close(key, Why::HostError, true);
                        continue;
                    }
                }
            }
            let mut flags = 0;
            let n = if conn.has_staged() {
                let n = room.min(conn.from_end - conn.from_pos);
                write(&conn.from_host[conn.from_pos..conn.from_pos + n]);
                conn.from_pos += n;
                if conn.seq_msg && !conn.has_staged() {
                    conn.seq_msg = false;
                    flags = SEQ_EOM;
                    // A message longer than a stream's read-ahead is not kept room for once it
                    // is sent: a connection holds at most STAGE bytes between messages.
                    if conn.from_host.capacity() > STAGE {
                        conn.from_host = Vec::new();
                    }
                }
                n
            } else {
                // Nothing staged after a read: end-of-file.
                0
            };
            if n == 0 {
                // The host client shut its write side: SHUT_WR becomes SHUTDOWN(SEND) and the
                // guest can still answer.
                conn.eof_sent = true;
                let (both_done, type_) = (conn.host_write_shut, conn.type_);
                let mut hdr = self.header_for(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                if both_done {
                    // Both directions finished: free the connection now and tell the guest
                    // with a SHUTDOWN of both directions; its RST completes the close.
                    self.close(key, Why::Done, false);
                    if self.closing.len() >= self.cfg.max_connections {
                        self.rst_closed(key, type_);
                        // The same turn again: this call has sent nothing yet.
                        self.inbox_first = inbox_first;
                        return self.next_rx_with(room, write);
                    }
                    self.closing.insert(key, (Instant::now(), type_));
                    hdr.flags |= SHUTDOWN_RCV;
                }
                self.counters.inc(Counter::rx_packets);
                return Some(hdr);
            }
            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
            let hdr = Header {
                len: n as u32,
                ..self.header_for(key, OP_RW, flags)
            };
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.reported_fwd_cnt = conn.fwd_cnt;
            }
            self.counters.inc(Counter::rx_packets);
            self.counters.add(Counter::rx_bytes, n as u64);
            // Round robin by host read: a connection keeps the next RX buffers until what one
            // read staged (up to 64 KiB) is sent, then goes to the back of the queue. Turning
            // at every 4 KiB buffer would wake a different guest reader for each buffer: with
            // 100 connections at once that made uploads 1.25-1.34x slower (docs/benchmarks.md).
            if let Some(conn) = self.conns.get_mut(&key) {
                if conn.has_staged() && !conn.in_rx_queue && conn.wants_rx() {
                    conn.in_rx_queue = true;
                    self.data_ready.push_front(key);
                    return Some(hdr);
                }
            }
            self.schedule(key);
            return Some(hdr);
        }
        if !inbox_first {
            if let Some(hdr) = self.next_from_inbox(room, write) {
                return Some(hdr);
            }
        }
        if !self.ctrl.is_empty() {
            // A host socket failed above and its connection was reset: the RST goes now, not
            // at the next event (`fill_rx` stops at the first `None`).
            return self.next_rx_with(room, write);
        }
        None
    }

    /// The next packet from another VM (or its first `room` bytes), if one waits.
    fn next_from_inbox(&mut self, room: usize, write: &mut dyn FnMut(&[u8])) -> Option<Header> {
        let p = self.inbox()?.pop(room)?;
        write(&p.data);
        self.counters.inc(Counter::rx_packets);
        self.counters.add(Counter::rx_bytes, p.data.len() as u64);
        Some(p.hdr)
    }

    /// A header from the host side of `key` to the guest.
    fn header_for(&self, key: ConnKey, op: u16, flags: u32) -> Header {
        let (type_, fwd_cnt, buf_alloc) = self
            .conns
            .get(&key)
            .map_or((TYPE_STREAM, 0, self.cfg.tx_buffer_size), |c| {
                (c.type_, c.fwd_cnt, c.buf_alloc)
            });
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cfg.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len: 0,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn push_ctrl(&mut self, hdr: Header) {
        if self.ctrl.len() >= ctrl_bound(&self.cfg) {
            let n = self.counters.inc(Counter::rx_overflow);
            if should_log(n) {
                info!(
                    cid = self.cfg.guest_cid,
                    "guest does not take its RX queue: dropped a control packet ({n} so far)"
                );
            }
            return;
        }
        if hdr.op == OP_RST {
            self.counters.inc(Counter::resets_sent);
        }
        self.ctrl.push_back(hdr);
    }

    fn push_ctrl_for(&mut self, key: ConnKey, op: u16, flags: u32) {
        let hdr = self.header_for(key, op, flags);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.reported_fwd_cnt = conn.fwd_cnt;
        }
        self.push_ctrl(hdr);
    }

    /// Answers `hdr` with RST (never answers a RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        self.push_ctrl(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.cfg.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// An RST for a connection already freed (`type_` was its socket type).
    fn rst_closed(&mut self, key: ConnKey, type_: u16) {
        self.push_ctrl(Header {
            type_,
            ..self.header_for(key, OP_RST, 0)
        });
    }

    /// Frees a connection (closing its host socket); with `rst`, tells the guest.
    fn close(&mut self, key: ConnKey, why: Why, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token);
        if conn.in_rx_queue {
            // Its schedule goes with it: a guest that opens and resets connections while it
            // gives no RX buffers must not grow the queue (it holds at most one key per open
            // connection).
            self.data_ready.retain(|k| *k != key);
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        self.counters.inc(Counter::connections_closed);
        self.resume_listeners();
        debug!(
            cid = self.cfg.guest_cid,
            "connection host port {} <-> guest port {} closed ({why:?})",
            key.host_port,
            key.guest_port
        );
        if rst {
            let hdr = Header {
                type_: conn.type_,
                fwd_cnt: conn.fwd_cnt,
                ..self.header_for(key, OP_RST, 0)
            };
            self.push_ctrl(hdr);
        }
    }

    // ---------------------------------------------------------------- host side

    /// Handles whatever is ready on the host side: new clients, their `CONNECT` lines, readable
    /// and writable connections, timeouts. Never blocks. Returns whether the periodic tick
    /// ([`DeviceConfig::tick`]) was among the events.
    pub fn handle_host_events(&mut self) -> bool {
        self.flush_pending();
        let mut events = [EpollEvent::default(); 64];
        let mut tick = false;
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("epoll_wait failed: {e}");
                    return tick;
                }
            };
            for ev in &events[..n] {
                let set = ev.event_set();
                match ev.data() {
                    TOKEN_LISTENER => self.accept_clients(false),
                    TOKEN_SEQ_LISTENER => self.accept_clients(true),
                    TOKEN_INBOX => {
                        if let Some(inbox) = self.inbox() {
                            inbox.clear_event();
                        }
                    }
                    TOKEN_TIMER => {
                        let _ = self.timer.wait();
                        self.sweep(Instant::now());
                        tick = true;
                    }
                    token => self.stream_event(token, set),
                }
            }
            if n < events.len() {
                return tick;
            }
        }
    }

    fn accept_clients(&mut self, seq: bool) {
        loop {
            let stream = match self.accept_one(seq) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // That client is gone; the next may be there.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the client stays in the backlog and the
                    // listener readable, so it is not watched until a tick or a close.
                    self.pause_listener(seq, &e);
                    return;
                }
            };
            if self.clients.len() >= self.cfg.max_handshakes {
                let n = self.counters.inc(Counter::handshake_limit);
                if should_log(n) {
                    info!(
                        "closed a client of {}: {} clients are already in their CONNECT handshake ({n} so far)",
                        self.cfg.uds_path.display(),
                        self.clients.len()
                    );
                }
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("cannot make a client socket non-blocking: {e}");
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = self.register(&stream, token) {
                warn!("cannot watch a client socket: {e}");
                continue;
            }
            self.clients.insert(
                token,
                PendingClient {
                    stream,
                    type_: if seq { TYPE_SEQPACKET } else { TYPE_STREAM },
                    handshake: Handshake::new(Instant::now(), self.cfg.handshake_timeout),
                },
            );
            self.tokens.insert(token, Token::Client);
            // Bytes may already be there: an edge-triggered watch reports only new ones.
            self.client_readable(token);
        }
    }

    fn accept_one(&self, seq: bool) -> io::Result<UnixStream> {
        #[cfg(test)]
        if let Some(errno) = self.accept_error {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let listener = if seq {
            &self.seq_listener
        } else {
            &self.listener
        };
        listener.accept().map(|(s, _)| s)
    }

    fn listener_fd_and_token(&self, seq: bool) -> (RawFd, u64) {
        if seq {
            (self.seq_listener.as_raw_fd(), TOKEN_SEQ_LISTENER)
        } else {
            (self.listener.as_raw_fd(), TOKEN_LISTENER)
        }
    }

    /// Stops watching a listener whose `accept` failed with `e` (counted in `accept_errors`,
    /// logged rate-limited), until [`Device::resume_listeners`].
    fn pause_listener(&mut self, seq: bool, e: &io::Error) {
        let n = self.counters.inc(Counter::accept_errors);
        if should_log(n) {
            warn!(
                cid = self.cfg.guest_cid,
                "cannot accept host clients on {}{}: {e}; not accepting until the next tick or a closed connection ({n} so far)",
                self.cfg.uds_path.display(),
                if seq { "_seqpacket" } else { "" }
            );
        }
        if self.paused_listeners[usize::from(seq)] {
            return;
        }
        let (fd, _) = self.listener_fd_and_token(seq);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            warn!("cannot stop watching a listener: {e}");
            return;
        }
        self.paused_listeners[usize::from(seq)] = true;
    }

    /// Watches the listeners paused by a failed `accept` again: called on every tick and when a
    /// connection or a host client is closed (a file descriptor was freed). A client waiting
    /// in the backlog is reported at once (the watch is level-triggered).
    fn resume_listeners(&mut self) {
        for seq in [false, true] {
            if !self.paused_listeners[usize::from(seq)] {
                continue;
            }
            let (fd, token) = self.listener_fd_and_token(seq);
            match self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                Ok(()) => self.paused_listeners[usize::from(seq)] = false,
                Err(e) => debug!("cannot watch a listener again (next tick): {e}"),
            }
        }
    }

    fn stream_event(&mut self, token: u64, set: EventSet) {
        match self.tokens.get(&token).copied() {
            None => {}
            Some(Token::Client) => self.client_readable(token),
            Some(Token::Conn(key)) => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) || hangup {
                    conn.host_readable = true;
                }
                if set.contains(EventSet::READ_HANG_UP) || hangup {
                    conn.host_hup = true;
                }
                if set.contains(EventSet::OUT) || hangup {
                    conn.host_writable = true;
                }
                self.flush(key);
                self.schedule(key);
            }
        }
    }

    fn client_readable(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE_LEN];
        let request = loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    let err = client.handshake.eof().err();
                    self.drop_client(token, err.map(|e| e.to_string()));
                    return;
                }
                Ok(n) => match client.handshake.push(&buf[..n]) {
                    Ok(Some(req)) => break req,
                    Ok(None) if client.type_ == TYPE_SEQPACKET => {
                        let msg = "the CONNECT line must come whole in the first message".into();
                        self.drop_client(token, Some(msg));
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.drop_client(token, Some(e.to_string()));
                        return;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.drop_client(token, Some(e.to_string()));
                    return;
                }
            }
        };
        let Some(mut client) = self.clients.remove(&token) else {
            return;
        };
        if self.at_connection_limit(format_args!(
            "host connection to guest port {}",
            request.port
        )) {
            self.tokens.remove(&token);
            return;
        }
        let host_port = self.alloc_host_port(request.port);
        let key = ConnKey {
            host_port,
            guest_port: request.port,
        };
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Modify,
            client.stream.as_raw_fd(),
            EpollEvent::new(stream_events(false), token),
        ) {
            warn!("cannot watch a client socket: {e}");
            self.tokens.remove(&token);
            return;
        }
        let leftover = client.handshake.take_leftover();
        if client.type_ == TYPE_SEQPACKET && !leftover.is_empty() {
            let msg = "bytes after the CONNECT line in its message".into();
            self.tokens.remove(&token);
            self.drop_client(token, Some(msg));
            return;
        }
        let buf_alloc = self.buf_alloc_for(&client.stream, client.type_);
        let mut conn = Conn::new(
            client.stream,
            token,
            State::Connecting {
                since: Instant::now(),
            },
            client.type_,
            buf_alloc,
        );
        conn.from_end = leftover.len();
        conn.from_host = leftover;
        self.conns.insert(key, conn);
        self.tokens.insert(token, Token::Conn(key));
        self.counters.inc(Counter::connections_opened);
        debug!(
            cid = self.cfg.guest_cid,
            "host client asks for guest port {}", request.port
        );
        self.push_ctrl_for(key, OP_REQUEST, 0);
    }

    fn drop_client(&mut self, token: u64, err: Option<String>) {
        self.clients.remove(&token);
        self.tokens.remove(&token);
        self.resume_listeners();
        if let Some(err) = err {
            let n = self.counters.inc(Counter::handshake_errors);
            if should_log(n) {
                info!(
                    "closed a client of {}: {err} ({n} so far)",
                    self.cfg.uds_path.display()
                );
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.resume_listeners();
        // Clean closes the guest never answered: forcibly disconnect, as the spec says.
        let wait = self.cfg.close_timeout;
        let unanswered: Vec<(ConnKey, u16)> = self
            .closing
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= wait)
            .map(|(k, (_, t))| (*k, *t))
            .collect();
        for (key, type_) in unanswered {
            self.closing.remove(&key);
            self.rst_closed(key, type_);
        }
        let expired: Vec<(u64, String)> = self
            .clients
            .iter()
            .filter_map(|(t, c)| {
                c.handshake
                    .check_deadline(now)
                    .err()
                    .map(|e| (*t, e.to_string()))
            })
            .collect();
        for (token, err) in expired {
            self.drop_client(token, Some(err));
        }
        // Safety net for any sender policy: a connection with freed credit the guest has not
        // heard of gets an update on each tick (twice a second), so it cannot stall for long.
        let stale_credit: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Established && c.fwd_cnt != c.reported_fwd_cnt)
            .map(|(k, _)| *k)
            .collect();
        for key in stale_credit {
            self.push_ctrl_for(key, OP_CREDIT_UPDATE, 0);
        }
        let timeout = self.cfg.connect_timeout;
        let stale: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, State::Connecting { since } if now.saturating_duration_since(since) >= timeout)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            let n = self.counters.inc(Counter::connect_timeouts);
            if should_log(n) {
                info!(
                    cid = self.cfg.guest_cid,
                    "guest did not answer a connection to its port {} within {timeout:?}",
                    key.guest_port
                );
            }
            self.close(key, Why::Timeout, true);
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn alloc_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                host_port: p,
                guest_port,
            };
            // Not a key still closing either: the guest's RST for the old connection would
            // otherwise reset the new one.
            if !self.conns.contains_key(&key) && !self.closing.contains_key(&key) {
                return p;
            }
        }
    }

    /// The credit a new connection gives the guest: `tx_buffer_size`; for seqpacket, no more
    /// than one message its host socket takes whole (`fit_seq_sndbuf`), so that the guest's own
    /// kernel refuses a longer message rather than the host socket, which would reset the
    /// connection.
    fn buf_alloc_for(&self, stream: &UnixStream, type_: u16) -> u32 {
        let buf = self.cfg.tx_buffer_size;
        if type_ != TYPE_SEQPACKET {
            return buf;
        }
        let room = fit_seq_sndbuf(stream, buf.min(MAX_GUEST_SEQ_MSG));
        if room < buf {
            debug!(
                cid = self.cfg.guest_cid,
                "a seqpacket connection's host socket takes messages of up to {room} bytes: \
                 that is its credit, not tx-buffer-size ({buf})"
            );
        }
        room
    }

    fn register(&self, stream: &UnixStream, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(stream_events(false), token),
        )
    }
}

/// What a host socket is watched for: readability and hang-ups always (edge-triggered),
/// writability only with `out` (see `Device::watch_writable`).
fn stream_events(out: bool) -> EventSet {
    let mut set = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    if out {
        set |= EventSet::OUT;
    }
    set
}

/// [`write_some`] of `a` then `b` in one `writev(2)` (a plain `write(2)` when `b` is empty).
fn write_some_vectored(stream: &mut UnixStream, a: &[u8], b: &[u8]) -> io::Result<usize> {
    loop {
        let written = if b.is_empty() {
            stream.write(a)
        } else {
            stream.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
        };
        match written {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One non-blocking write: `Ok(0)` when the socket is full.
fn write_some(stream: &mut UnixStream, buf: &[u8]) -> io::Result<usize> {
    write_some_vectored(stream, buf, &[])
}

/// Appends `data` to `q`, growing its room to at most `bound` elements (or what `data` needs):
/// `VecDeque` doubles its room, so a queue bounded by `bound` could otherwise take up to twice
/// that, and keep it (it is never shrunk).
fn extend_within<T: Copy>(q: &mut VecDeque<T>, data: &[T], bound: usize) {
    let need = q.len() + data.len();
    if need > q.capacity() {
        let room = (q.capacity() * 2).clamp(need, bound.max(need));
        q.reserve_exact(room - q.len());
    }
    q.extend(data);
}

/// Raises the send buffer of a host seqpacket socket, if it is short, so that one message of
/// `want` bytes fits, and returns the longest message the socket then takes whole, at most
/// `want` (read back: whatever the kernel made of the request).
/// Linux refuses a message longer than `SO_SNDBUF - 32` with `EMSGSIZE`, and the default
/// `SO_SNDBUF` (212 992) is below the default `tx-buffer-size`. `SO_SNDBUF` is capped by
/// `net.core.wmem_max` (and doubled by the kernel); past that `SO_SNDBUFFORCE` is tried, which
/// takes `CAP_NET_ADMIN` (`EPERM` without: the smaller buffer stays, and the answer says so).
fn fit_seq_sndbuf(stream: &UnixStream, want: u32) -> u32 {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let need = want as usize + UNIX_MSG_OVERHEAD;
    let sndbuf = || getsockopt(stream, sockopt::SndBuf);
    let mut have = match sndbuf() {
        Ok(n) => n,
        Err(e) => {
            debug!("cannot read a seqpacket socket's SO_SNDBUF: {e}");
            return want;
        }
    };
    if have < need {
        // The kernel doubles what it is given.
        let _ = setsockopt(stream, sockopt::SndBuf, &need.div_ceil(2));
        have = sndbuf().unwrap_or(have);
    }
    if have < need {
        let _ = setsockopt(stream, sockopt::SndBufForce, &need.div_ceil(2));
        have = sndbuf().unwrap_or(have);
    }
    let room = have.saturating_sub(UNIX_MSG_OVERHEAD);
    u32::try_from(room).unwrap_or(u32::MAX).min(want)
}

/// Connects to a Unix stream socket without blocking: a listener whose backlog is full refuses
/// (`EAGAIN`) rather than stalling every other connection of the VM.
fn connect_nonblocking(path: &Path, seqpacket: bool) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        if seqpacket {
            SockType::SeqPacket
        } else {
            SockType::Stream
        },
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(UnixStream::from(fd))
}

/// Removes `path` if it is a socket nobody listens on, so that a restarted backend can bind.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A listening, non-blocking `SOCK_SEQPACKET` Unix socket. `UnixListener` only wraps the fd:
/// `accept` works the same for every socket type.
pub(crate) fn listen_seqpacket(path: &Path) -> io::Result<UnixListener> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    bind(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    listen(&fd, Backlog::new(128).map_err(io::Error::from)?).map_err(io::Error::from)?;
    Ok(UnixListener::from(fd))
}

/// Receives one seqpacket message into `buf`: `Ok(0)` is end-of-file (so an empty host message
/// is taken as end-of-file too). A message longer than `buf` is an error, never cut.
fn recv_message(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    let n = recv(
        stream.as_raw_fd(),
        buf,
        MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    if n > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a seqpacket message of {n} bytes exceeds the {} byte bound",
                buf.len()
            ),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device in a fresh directory (removed on drop), no timer-driven packets.
    struct TestDevice {
        dev: Device,
        dir: PathBuf,
    }

    impl Drop for TestDevice {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn test_device(name: &str, tweak: impl FnOnce(&mut DeviceConfig)) -> TestDevice {
        device_in_dir(name, tweak, None)
    }

    /// VM 3's device, with VM 4 in the same group through a [`Router`].
    fn routed_device(name: &str) -> (TestDevice, Arc<Router>) {
        let g = ["g".to_string()];
        let router = Arc::new(Router::new([(3, &g[..]), (4, &g[..])]).expect("router"));
        (device_in_dir(name, |_| {}, Some(router.clone())), router)
    }

    fn device_in_dir(
        name: &str,
        tweak: impl FnOnce(&mut DeviceConfig),
        router: Option<Arc<Router>>,
    ) -> TestDevice {
        let dir =
            std::env::temp_dir().join(format!("vmlink-vhost-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut cfg = DeviceConfig::new(3, dir.join("v"));
        cfg.tick = Duration::from_secs(3600);
        tweak(&mut cfg);
        let dev = Device::with_router(cfg, Arc::new(Counters::default()), router).expect("device");
        TestDevice { dev, dir }
    }

    /// A seqpacket connection the guest opens from port 5000 to a host listener on port 1234:
    /// the host's end (the device's RESPONSE is not taken yet).
    fn seqpacket_from_guest(t: &mut TestDevice) -> UnixStream {
        let l = listen_seqpacket(&t.dir.join("v_1234")).expect("listen");
        let seq = Header {
            type_: TYPE_SEQPACKET,
            ..guest(OP_REQUEST, 5000, 1234)
        };
        t.dev.on_guest_packet(&seq, &[]);
        l.accept().expect("accept").0
    }

    /// A guest-to-host header from guest port `gport` to host port `hport`.
    fn guest(op: u16, gport: u32, hport: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn closed_connections_leave_nothing_in_the_rx_queue() {
        // REQUEST, CREDIT_UPDATE (schedules the connection for RX), RST: repeated while the
        // guest gives no RX buffers. The schedule of a closed connection must go with it.
        let mut t = test_device("data-ready", |_| {});
        let _l = UnixListener::bind(t.dir.join("v_1234")).expect("bind");
        for round in 0..3000u32 {
            let port = 5000 + round % 7;
            t.dev.on_guest_packet(&guest(OP_REQUEST, port, 1234), &[]);
            t.dev
                .on_guest_packet(&guest(OP_CREDIT_UPDATE, port, 1234), &[]);
            t.dev.on_guest_packet(&guest(OP_RST, port, 1234), &[]);
        }
        assert_eq!(t.dev.connection_count(), 0);
        assert!(
            t.dev.data_ready.len() <= t.dev.connection_count(),
            "{} keys scheduled for {} connections",
            t.dev.data_ready.len(),
            t.dev.connection_count()
        );
    }

    #[test]
    fn empty_seqpacket_messages_are_dropped_and_waiting_messages_are_bounded() {
        let mut t = test_device("seq-bound", |c| c.tx_buffer_size = 4096);
        let l = listen_seqpacket(&t.dir.join("v_1234")).expect("listen");
        let seq = |op, flags, data: &[u8]| Header {
            type_: TYPE_SEQPACKET,
            flags,
            len: data.len() as u32,
            ..guest(op, 5000, 1234)
        };
        t.dev.on_guest_packet(&seq(OP_REQUEST, 0, &[]), &[]);
        let (host, _) = l.accept().expect("accept");
        host.set_nonblocking(true).expect("nb");
        // An empty message, then "hi": the host's first message is "hi" (an empty one would
        // read as end-of-file there).
        t.dev.on_guest_packet(&seq(OP_RW, SEQ_EOM, &[]), &[]);
        t.dev.on_guest_packet(&seq(OP_RW, SEQ_EOM, b"hi"), b"hi");
        let mut b = [0u8; 16];
        assert_eq!(recv_message(&host, &mut b).expect("recv"), 2);
        assert_eq!(&b[..2], b"hi");
        assert_eq!(t.dev.counters.get(Counter::empty_messages), 1);

        // The host stops reading: 1-byte messages fill its socket, then wait in the device,
        // at most `seq_msg_bound` of them; empty ones never do.
        let bound = seq_msg_bound(4096);
        let key = ConnKey {
            host_port: 1234,
            guest_port: 5000,
        };
        let mut sent = 0usize;
        while t.dev.connection_count() == 1 && sent < 8192 {
            for _ in 0..100 {
                t.dev.on_guest_packet(&seq(OP_RW, SEQ_EOM, &[]), &[]);
            }
            if let Some(c) = t.dev.conns.get(&key) {
                assert!(c.msg_lens.len() <= bound, "{} waiting", c.msg_lens.len());
            }
            t.dev.on_guest_packet(&seq(OP_RW, SEQ_EOM, b"x"), b"x");
            sent += 1;
        }
        assert_eq!(t.dev.connection_count(), 0, "reset after {sent} messages");
        assert_eq!(t.dev.counters.get(Counter::seqpacket_limit), 1);
        assert_eq!(t.dev.counters.get(Counter::credit_violations), 0);
        // What the host socket took, plus the bound, plus the one that was refused.
        let mut taken = 0usize;
        while recv_message(&host, &mut b).is_ok_and(|n| n == 1) {
            taken += 1;
        }
        assert_eq!(sent, taken + bound + 1, "the host socket took {taken}");
        let mut rst = None;
        while let Some(h) = t.dev.next_rx(&mut b) {
            if h.op == OP_RST {
                rst = Some(h);
            }
        }
        let rst = rst.expect("an RST");
        assert_eq!(
            (rst.src_port, rst.dst_port, rst.type_),
            (1234, 5000, TYPE_SEQPACKET)
        );
    }

    #[test]
    fn a_packet_dropped_for_a_full_inbox_resets_both_halves() {
        let (mut t, router) = routed_device("vm2vm");
        let a = &mut t.dev;
        let to_b = |op| Header {
            dst_cid: 4,
            ..guest(op, 5000, 6000)
        };
        // VM 4 takes nothing: its inbox fills.
        let rw = Header {
            len: 1,
            ..to_b(OP_RW)
        };
        while router.forward(&rw, b"x").is_ok() {}
        a.on_guest_packet(&rw, b"x");
        assert_eq!(a.counters.get(Counter::forward_dropped), 1);
        let mut b = [0u8; 16];
        let rst = a.next_rx(&mut b).expect("the sender's RST");
        assert_eq!(
            (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
            (OP_RST, 4, 3, 6000, 5000)
        );
        let inbox = router.inbox(4).expect("inbox");
        let mut last = None;
        while let Some(p) = inbox.pop(usize::MAX) {
            last = Some(p.hdr);
        }
        let last = last.expect("packets");
        assert_eq!(
            (
                last.op,
                last.src_cid,
                last.dst_cid,
                last.src_port,
                last.dst_port
            ),
            (OP_RST, 3, 4, 5000, 6000),
            "the receiver's RST, as from the sender"
        );
    }

    #[test]
    fn packets_from_another_vm_and_host_data_take_turns_at_rx_buffers() {
        let (mut t, router) = routed_device("turns");
        let dev = &mut t.dev;
        // A host connection with data for the guest.
        let l = UnixListener::bind(t.dir.join("v_1234")).expect("listen");
        dev.on_guest_packet(&guest(OP_REQUEST, 5000, 1234), &[]);
        let mut host = l.accept().expect("accept").0;
        host.write_all(&[b'h'; 64 << 10]).expect("host data");
        dev.handle_host_events();
        // VM 4 keeps sending to this guest: its packets wait in the inbox.
        let from_4 = Header {
            src_cid: 4,
            dst_cid: 3,
            src_port: 7000,
            dst_port: 7001,
            len: 4096,
            op: OP_RW,
            ..guest(OP_RW, 0, 0)
        };
        while router.forward(&from_4, &[b'v'; 4096]).is_ok() {}
        let mut b = vec![0u8; 4096];
        let mut order = Vec::new();
        while order.len() < 16 {
            let h = dev.next_rx(&mut b).expect("a packet for the guest");
            if h.op == OP_RW {
                order.push(h.src_cid);
            }
        }
        let host_turns = order.iter().filter(|&&c| c == HOST_CID).count();
        assert_eq!(host_turns, 8, "host and VM 4 alternate: {order:?}");
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    }

    /// Two host connections with data for the guest: each keeps the RX buffers until what one
    /// read of its socket staged (64 KiB) is sent, then the other has its turn.
    #[test]
    fn a_connection_keeps_rx_buffers_for_one_staged_read_then_the_next_has_its_turn() {
        let mut t = test_device("staged-turns", |_| {});
        let dev = &mut t.dev;
        let l = UnixListener::bind(t.dir.join("v_1234")).expect("listen");
        let mut hosts = Vec::new();
        for port in [5000, 5001] {
            dev.on_guest_packet(&guest(OP_REQUEST, port, 1234), &[]);
            let mut host = l.accept().expect("accept").0;
            host.write_all(&[port as u8; 128 << 10]).expect("host data");
            hosts.push(host);
        }
        dev.handle_host_events();
        let mut b = vec![0u8; 4096];
        let mut order = Vec::new();
        while order.len() < 64 {
            let h = dev.next_rx(&mut b).expect("a packet for the guest");
            if h.op == OP_RW {
                assert_eq!(h.len, 4096);
                order.push(h.dst_port);
            }
        }
        // 64 KiB is 16 buffers: 16 for one connection, 16 for the other, and again.
        let runs: Vec<(u32, usize)> = order
            .chunk_by(|a, b| a == b)
            .map(|r| (r[0], r.len()))
            .collect();
        assert_eq!(runs.len(), 4, "{runs:?}");
        assert!(runs.iter().all(|&(_, n)| n == 16), "{runs:?}");
        assert!(runs.windows(2).all(|w| w[0].0 != w[1].0), "{runs:?}");
    }

    #[test]
    fn a_big_host_message_is_not_kept_room_for_once_sent() {
        let mut t = test_device("seq-stage", |_| {});
        let mut host = seqpacket_from_guest(&mut t);
        let msg: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(host.write(&msg).expect("one message"), msg.len());
        t.dev.handle_host_events();
        let mut got = Vec::new();
        let mut b = vec![0u8; MAX_PKT_DATA];
        while let Some(h) = t.dev.next_rx(&mut b) {
            if h.op == OP_RW {
                got.extend_from_slice(&b[..h.len as usize]);
                if h.flags & SEQ_EOM != 0 {
                    break;
                }
            }
        }
        assert!(got == msg, "{} of {} bytes", got.len(), msg.len());
        let key = ConnKey {
            host_port: 1234,
            guest_port: 5000,
        };
        let cap = t.dev.conns[&key].from_host.capacity();
        assert!(cap <= STAGE, "{cap} bytes kept");
    }

    #[test]
    fn a_guest_restart_frees_the_old_boots_connections_and_keeps_undelivered_requests() {
        let mut t = test_device("restart", |_| {});
        let l = UnixListener::bind(t.dir.join("v_1234")).expect("bind");
        // A guest connection, established.
        t.dev.on_guest_packet(&guest(OP_REQUEST, 5000, 1234), &[]);
        let (mut host, _) = l.accept().expect("accept");
        // A host connection whose REQUEST the guest got (and never answered)...
        let uds = t.dev.config().uds_path.clone();
        let mut asked = UnixStream::connect(&uds).expect("connect");
        asked.write_all(b"CONNECT 52\n").expect("w");
        t.dev.handle_host_events();
        let mut b = [0u8; 64];
        let mut ops = Vec::new();
        while let Some(h) = t.dev.next_rx(&mut b) {
            ops.push(h.op);
        }
        assert_eq!(ops, [OP_RESPONSE, OP_REQUEST]);
        // ...and one whose REQUEST still waits, with credit news for the old boot behind it.
        let mut waiting = UnixStream::connect(&uds).expect("connect");
        waiting.write_all(b"CONNECT 53\n").expect("w");
        t.dev.handle_host_events();
        t.dev
            .on_guest_packet(&guest(OP_CREDIT_REQUEST, 5000, 1234), &[]);
        host.write_all(b"for the old boot").expect("w");
        t.dev.handle_host_events();
        assert_eq!(t.dev.connection_count(), 3);

        assert_eq!(t.dev.guest_restarted(), 2);
        assert_eq!(t.dev.connection_count(), 1);
        // Closed: end-of-file, or a reset where the device left host bytes unread.
        for (who, s) in [
            ("guest connection", &mut host),
            ("delivered request", &mut asked),
        ] {
            let mut rest = Vec::new();
            match s.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty(), "{who}"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}"),
            }
        }
        // The new driver gets the waiting REQUEST, and nothing of the old boot.
        let h = t.dev.next_rx(&mut b).expect("the waiting REQUEST");
        assert_eq!((h.op, h.dst_port), (OP_REQUEST, 53));
        assert!(t.dev.next_rx(&mut b).is_none());
        assert!(!t.dev.has_rx());
        // It answers, and the waiting client is served.
        t.dev.on_guest_packet(
            &Header {
                dst_port: h.src_port,
                ..guest(OP_RESPONSE, 53, 0)
            },
            &[],
        );
        let want = format!("OK {}\n", h.src_port);
        let mut line = vec![0u8; want.len()];
        waiting.read_exact(&mut line).expect("OK line");
        assert_eq!(String::from_utf8_lossy(&line), want);
        assert_eq!(t.dev.connection_count(), 1);
    }

    /// Reads what is left on `s` until the peer closed it: end-of-file, or a reset where the
    /// device left bytes unread. Fails (after 5 s) if the socket stays open.
    fn assert_closed(who: &str, s: &mut UnixStream) -> Vec<u8> {
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{who}: {e}"),
        }
        rest
    }

    /// Whether `s` is still open with nothing to read.
    fn is_open_and_quiet(s: &UnixStream) -> bool {
        s.set_nonblocking(true).expect("nb");
        let mut b = [0u8; 8];
        matches!((&*s).read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn host_clients_in_their_handshake_are_bounded_and_time_out() {
        let timeout = Duration::from_secs(5);
        let mut t = test_device("handshakes", |c| {
            c.max_handshakes = 2;
            c.handshake_timeout = timeout;
        });
        let uds = t.dev.config().uds_path.clone();
        let before = Instant::now();
        // Two clients in their handshake: half a line, nothing at all.
        let mut half = UnixStream::connect(&uds).expect("connect");
        half.write_all(b"CONNECT").expect("w");
        let mut mute = UnixStream::connect(&uds).expect("connect");
        t.dev.handle_host_events();
        assert_eq!(t.dev.handshake_count(), 2);
        assert_eq!(t.dev.counters.get(Counter::handshake_limit), 0);
        // The third is over the bound: closed at once, counted.
        let mut third = UnixStream::connect(&uds).expect("connect");
        t.dev.handle_host_events();
        assert_eq!(t.dev.handshake_count(), 2);
        assert_eq!(t.dev.counters.get(Counter::handshake_limit), 1);
        assert!(assert_closed("third client", &mut third).is_empty());
        assert!(is_open_and_quiet(&half) && is_open_and_quiet(&mute));
        let after = Instant::now();

        // The device's clock: just before the deadline nothing happens, at it both go.
        t.dev.sweep(before + timeout - Duration::from_millis(1));
        assert_eq!(t.dev.handshake_count(), 2, "not yet timed out");
        assert_eq!(t.dev.counters.get(Counter::handshake_errors), 0);
        t.dev.sweep(after + timeout);
        assert_eq!(t.dev.handshake_count(), 0);
        assert_eq!(t.dev.counters.get(Counter::handshake_errors), 2);
        assert!(assert_closed("half a line", &mut half).is_empty());
        assert!(assert_closed("mute client", &mut mute).is_empty());
        assert_eq!(t.dev.connection_count(), 0);
        assert!(!t.dev.has_rx(), "nothing for the guest");

        // The room is free again: a new client is served.
        let mut next = UnixStream::connect(&uds).expect("connect");
        next.write_all(b"CONNECT 52\n").expect("w");
        t.dev.handle_host_events();
        assert_eq!(t.dev.handshake_count(), 0);
        assert_eq!(t.dev.connection_count(), 1);
        let mut b = [0u8; 16];
        let req = t.dev.next_rx(&mut b).expect("a REQUEST");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
        assert_eq!(t.dev.counters.get(Counter::handshake_limit), 1);
    }

    #[test]
    fn a_host_connection_the_guest_never_answers_is_reset_and_closed() {
        let timeout = Duration::from_secs(10);
        let mut t = test_device("connect-timeout", |c| c.connect_timeout = timeout);
        let uds = t.dev.config().uds_path.clone();
        let before = Instant::now();
        let mut silent = UnixStream::connect(&uds).expect("connect");
        silent.write_all(b"CONNECT 52\n").expect("w");
        let mut answered = UnixStream::connect(&uds).expect("connect");
        answered.write_all(b"CONNECT 53\n").expect("w");
        t.dev.handle_host_events();
        let mut b = [0u8; 64];
        let mut reqs = Vec::new();
        while let Some(h) = t.dev.next_rx(&mut b) {
            assert_eq!(h.op, OP_REQUEST);
            reqs.push(h);
        }
        reqs.sort_by_key(|h| h.dst_port);
        let [to52, to53] = reqs[..] else {
            panic!("two REQUESTs: {reqs:?}")
        };
        assert_eq!((to52.dst_port, to53.dst_port), (52, 53));
        // The guest accepts port 53 only.
        t.dev
            .on_guest_packet(&guest(OP_RESPONSE, 53, to53.src_port), &[]);
        let want = format!("OK {}\n", to53.src_port);
        let mut line = vec![0u8; want.len()];
        answered.read_exact(&mut line).expect("OK line");
        assert_eq!(String::from_utf8_lossy(&line), want);
        let after = Instant::now();

        t.dev.sweep(before + timeout - Duration::from_millis(1));
        assert_eq!(t.dev.connection_count(), 2, "not yet timed out");
        assert_eq!(t.dev.counters.get(Counter::connect_timeouts), 0);
        assert!(t.dev.next_rx(&mut b).is_none());
        t.dev.sweep(after + timeout);
        assert_eq!(t.dev.counters.get(Counter::connect_timeouts), 1);
        assert_eq!(t.dev.connection_count(), 1, "the accepted one stays");
        let rst = t.dev.next_rx(&mut b).expect("an RST");
        assert_eq!(
            (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
            (OP_RST, HOST_CID, 3, to52.src_port, 52)
        );
        assert!(t.dev.next_rx(&mut b).is_none());
        assert!(
            assert_closed("unanswered client", &mut silent).is_empty(),
            "closed without an OK line"
        );
        assert!(is_open_and_quiet(&answered));
        // A late answer finds nothing: RST.
        t.dev
            .on_guest_packet(&guest(OP_RESPONSE, 52, to52.src_port), &[]);
        let late = t.dev.next_rx(&mut b).expect("an RST for the late answer");
        assert_eq!((late.op, late.dst_port), (OP_RST, 52));
        assert_eq!(t.dev.connection_count(), 1);
    }

    #[test]
    fn control_packets_for_a_guest_that_takes_no_rx_buffers_are_bounded() {
        let mut t = test_device("ctrl-bound", |c| c.max_connections = 1);
        let bound = ctrl_bound(t.dev.config());
        assert_eq!(bound, 4 + 1024);
        // Data for connections that do not exist: each is answered with RST, and the guest
        // takes none of them.
        let bogus = |i: usize| Header {
            len: 0,
            ..guest(OP_RW, 10_000 + i as u32, 1234)
        };
        for i in 0..bound {
            t.dev.on_guest_packet(&bogus(i), &[]);
        }
        assert_eq!(t.dev.ctrl.len(), bound);
        assert_eq!(t.dev.counters.get(Counter::rx_overflow), 0, "at the bound");
        assert_eq!(t.dev.counters.get(Counter::resets_sent), bound as u64);
        for i in bound..bound + 10 {
            t.dev.on_guest_packet(&bogus(i), &[]);
        }
        assert_eq!(t.dev.ctrl.len(), bound, "past the bound");
        assert_eq!(t.dev.counters.get(Counter::rx_overflow), 10);
        assert_eq!(t.dev.counters.get(Counter::resets_sent), bound as u64);
        // The guest gets the oldest `bound` of them, then nothing.
        let mut b = [0u8; 16];
        let mut ports = Vec::new();
        while let Some(h) = t.dev.next_rx(&mut b) {
            assert_eq!(h.op, OP_RST);
            ports.push(h.dst_port);
        }
        let want: Vec<u32> = (0..bound as u32).map(|i| 10_000 + i).collect();
        assert_eq!(ports, want);
        // Room again once the guest took them.
        t.dev.on_guest_packet(&bogus(0), &[]);
        assert_eq!(t.dev.ctrl.len(), 1);
        assert_eq!(t.dev.counters.get(Counter::rx_overflow), 10);
    }

    #[test]
    fn a_host_seqpacket_message_over_the_bound_resets_the_connection() {
        use nix::sys::socket::{setsockopt, sockopt};
        let mut t = test_device("seq-max", |_| {});
        let mut host = seqpacket_from_guest(&mut t);
        // Room for a message over 256 KiB in the host's send buffer (212 992 by default).
        setsockopt(&host, sockopt::SndBuf, &(2 << 20)).expect("SO_SNDBUF");
        let mut b = vec![0u8; MAX_PKT_DATA];
        assert_eq!(t.dev.next_rx(&mut b).map(|h| h.op), Some(OP_RESPONSE));

        // Exactly the bound: delivered whole, the end-of-message flag on its last packet only.
        let msg: Vec<u8> = (0..MAX_HOST_SEQ_MSG as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(host.write(&msg).expect("one message"), msg.len());
        t.dev.handle_host_events();
        let mut got = Vec::new();
        let mut packets = 0;
        while let Some(h) = t.dev.next_rx(&mut b) {
            assert_eq!((h.op, h.type_), (OP_RW, TYPE_SEQPACKET));
            packets += 1;
            got.extend_from_slice(&b[..h.len as usize]);
            let last = got.len() == msg.len();
            assert_eq!(h.flags & SEQ_EOM != 0, last, "EOM on packet {packets}");
            if last {
                break;
            }
        }
        assert!(got == msg, "{} of {} bytes", got.len(), msg.len());
        assert_eq!(packets, MAX_HOST_SEQ_MSG / MAX_PKT_DATA);

        // One byte more: the connection is reset, nothing of the message reaches the guest.
        let over = vec![7u8; MAX_HOST_SEQ_MSG + 1];
        assert_eq!(host.write(&over).expect("one message"), over.len());
        t.dev.handle_host_events();
        // At once: the same call that found the message too long gives the guest its RST.
        let rst = t.dev.next_rx(&mut b).expect("an RST");
        assert_eq!(
            (rst.op, rst.type_, rst.src_port, rst.dst_port),
            (OP_RST, TYPE_SEQPACKET, 1234, 5000)
        );
        assert!(t.dev.next_rx(&mut b).is_none(), "no cut message");
        assert_eq!(t.dev.connection_count(), 0);
        assert!(assert_closed("host seqpacket socket", &mut host).is_empty());
    }

    /// The guest's seqpacket message `msg` on the connection of [`seqpacket_from_guest`], as RW
    /// packets of at most 60 000 bytes, EOM on the last.
    fn send_seq_message(dev: &mut Device, msg: &[u8]) {
        let n = msg.chunks(60_000).count();
        for (i, c) in msg.chunks(60_000).enumerate() {
            let hdr = Header {
                type_: TYPE_SEQPACKET,
                len: c.len() as u32,
                flags: if i + 1 == n { SEQ_EOM } else { 0 },
                ..guest(OP_RW, 5000, 1234)
            };
            dev.on_guest_packet(&hdr, c);
        }
    }

    /// The longest message the device's host socket of `key` takes whole (Linux: `SO_SNDBUF - 32`).
    fn host_msg_limit(dev: &Device, key: ConnKey) -> usize {
        use nix::sys::socket::{getsockopt, sockopt};
        let sndbuf = getsockopt(&dev.conns[&key].stream, sockopt::SndBuf).expect("SO_SNDBUF");
        sndbuf - UNIX_MSG_OVERHEAD
    }

    const SEQ_KEY: ConnKey = ConnKey {
        host_port: 1234,
        guest_port: 5000,
    };

    #[test]
    fn a_guest_seqpacket_message_over_the_default_socket_limit_reaches_the_host_whole() {
        // With the default SO_SNDBUF (212 992) a Unix seqpacket socket refuses messages over
        // 212 960 bytes; the default credit (256 KiB) lets a Linux guest send one of 240 000.
        let mut t = test_device("seq-big", |_| {});
        let host = seqpacket_from_guest(&mut t);
        let mut b = vec![0u8; 64];
        let resp = t.dev.next_rx(&mut b).expect("RESPONSE");
        assert_eq!(resp.op, OP_RESPONSE);
        let mut size = 240_000;
        if (resp.buf_alloc as usize) < size {
            // Neither net.core.wmem_max nor CAP_NET_ADMIN allows the room here.
            eprintln!("only {} bytes of credit here", resp.buf_alloc);
            size = resp.buf_alloc as usize;
        }
        let msg: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
        send_seq_message(&mut t.dev, &msg);
        assert_eq!(t.dev.connection_count(), 1, "connection reset");
        assert_eq!(t.dev.counters.get(Counter::credit_violations), 0);
        let mut got = vec![0u8; MAX_GUEST_SEQ_MSG as usize + 1];
        let n = recv_message(&host, &mut got).expect("the message");
        assert!(got[..n] == msg[..], "{n} of {} bytes", msg.len());
        while let Some(h) = t.dev.next_rx(&mut b) {
            assert_ne!(h.op, OP_RST);
        }
    }

    #[test]
    fn a_seqpacket_connections_credit_is_one_message_its_host_socket_takes() {
        // A tx-buffer-size over what any Unix socket takes in one message.
        let mut t = test_device("seq-credit", |c| c.tx_buffer_size = 64 << 20);
        let host = seqpacket_from_guest(&mut t);
        let mut b = vec![0u8; 64];
        let resp = t.dev.next_rx(&mut b).expect("RESPONSE");
        let limit = host_msg_limit(&t.dev, SEQ_KEY);
        let credit = resp.buf_alloc;
        assert!(
            credit as usize <= limit && credit <= MAX_GUEST_SEQ_MSG,
            "guest-initiated: credit {credit}, the socket takes {limit}"
        );
        assert!(
            credit > 212_960,
            "the socket's room was not raised: {credit}"
        );

        // Host-initiated, on <uds-path>_seqpacket.
        let seq_path = seqpacket_listener_path(&t.dev.config().uds_path);
        let mut client = connect_nonblocking(&seq_path, true).expect("connect");
        client.write_all(b"CONNECT 52\n").expect("w");
        t.dev.handle_host_events();
        let req = t.dev.next_rx(&mut b).expect("REQUEST");
        assert_eq!(
            (req.op, req.type_, req.dst_port),
            (OP_REQUEST, TYPE_SEQPACKET, 52)
        );
        let key = ConnKey {
            host_port: req.src_port,
            guest_port: 52,
        };
        let limit = host_msg_limit(&t.dev, key);
        assert!(
            req.buf_alloc as usize <= limit && req.buf_alloc <= MAX_GUEST_SEQ_MSG,
            "host-initiated: credit {}, the socket takes {limit}",
            req.buf_alloc
        );

        // A stream connection keeps tx-buffer-size.
        let _l = UnixListener::bind(t.dir.join("v_1235")).expect("bind");
        t.dev.on_guest_packet(&guest(OP_REQUEST, 5001, 1235), &[]);
        let resp = t.dev.next_rx(&mut b).expect("RESPONSE");
        assert_eq!((resp.op, resp.buf_alloc), (OP_RESPONSE, 64 << 20));

        // A message of the whole credit reaches the host whole...
        let msg: Vec<u8> = (0..credit).map(|i| (i % 253) as u8).collect();
        send_seq_message(&mut t.dev, &msg);
        let mut got = vec![0u8; credit as usize + 1];
        let n = recv_message(&host, &mut got).expect("the message");
        assert!(got[..n] == msg[..], "{n} of {credit} bytes");
        // ...one byte longer is over the credit: a violation, as the guest's kernel would
        // refuse it (EMSGSIZE), not a host socket error.
        let over = vec![1u8; credit as usize + 1];
        send_seq_message(&mut t.dev, &over);
        assert_eq!(t.dev.counters.get(Counter::credit_violations), 1);
        assert!(!t.dev.conns.contains_key(&SEQ_KEY));
    }

    #[test]
    fn the_room_buffered_toward_a_host_that_does_not_read_stays_within_the_credit() {
        let buf = 4 << 20;
        let mut t = test_device("to-host-room", |c| c.tx_buffer_size = buf);
        let l = UnixListener::bind(t.dir.join("v_1234")).expect("bind");
        t.dev.on_guest_packet(&guest(OP_REQUEST, 5000, 1234), &[]);
        let _host = l.accept().expect("accept").0;
        // The host reads nothing: what its socket does not take waits in the device.
        let chunk = vec![9u8; 60_000];
        let mut sent = 0;
        while sent + chunk.len() <= buf as usize {
            let hdr = Header {
                len: chunk.len() as u32,
                ..guest(OP_RW, 5000, 1234)
            };
            t.dev.on_guest_packet(&hdr, &chunk);
            t.dev.flush_pending();
            sent += chunk.len();
        }
        assert_eq!(t.dev.counters.get(Counter::credit_violations), 0);
        let conn = &t.dev.conns[&SEQ_KEY];
        assert!(
            conn.to_host.len() > 3 << 20,
            "{} bytes wait",
            conn.to_host.len()
        );
        // Plain doubling took over 5 MiB of room for these 3.9 MiB.
        let room = conn.to_host.capacity();
        assert!(room <= buf as usize, "{room} bytes of room");
    }

    /// Whether `fd` is readable now (`poll` with no timeout).
    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and a zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    #[test]
    fn a_listener_out_of_file_descriptors_is_not_watched_until_a_tick_or_a_close() {
        let mut t = test_device("accept-error", |_| {});
        let uds = t.dev.config().uds_path.clone();
        // A guest connection, to close later.
        let _l = UnixListener::bind(t.dir.join("v_1234")).expect("bind");
        t.dev.on_guest_packet(&guest(OP_REQUEST, 5000, 1234), &[]);
        let mut b = [0u8; 64];
        assert_eq!(t.dev.next_rx(&mut b).map(|h| h.op), Some(OP_RESPONSE));

        t.dev.accept_error = Some(libc::EMFILE);
        let mut client = UnixStream::connect(&uds).expect("connect");
        client.write_all(b"CONNECT 52\n").expect("w");
        assert!(readable(t.dev.epoll_fd()));
        t.dev.handle_host_events();
        assert_eq!(t.dev.counters.get(Counter::accept_errors), 1);
        // The client waits in the backlog, but the device is not woken for it again and again.
        assert!(!readable(t.dev.epoll_fd()), "the device would spin");
        t.dev.handle_host_events();
        assert_eq!(t.dev.counters.get(Counter::accept_errors), 1);

        // The next tick: one more try, still failing, and quiet again.
        t.dev.sweep(Instant::now());
        assert!(readable(t.dev.epoll_fd()));
        t.dev.handle_host_events();
        assert_eq!(t.dev.counters.get(Counter::accept_errors), 2);
        assert!(!readable(t.dev.epoll_fd()));

        // A closed connection frees a descriptor: another try, now served.
        t.dev.accept_error = None;
        t.dev.on_guest_packet(&guest(OP_RST, 5000, 1234), &[]);
        assert_eq!(t.dev.connection_count(), 0);
        assert!(readable(t.dev.epoll_fd()));
        t.dev.handle_host_events();
        assert_eq!(t.dev.connection_count(), 1);
        let req = t.dev.next_rx(&mut b).expect("REQUEST");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));

        // Out of descriptors again; the tick brings the listener back once they are free.
        t.dev.accept_error = Some(libc::ENFILE);
        let mut second = UnixStream::connect(&uds).expect("connect");
        second.write_all(b"CONNECT 53\n").expect("w");
        t.dev.handle_host_events();
        assert_eq!(t.dev.counters.get(Counter::accept_errors), 3);
        assert!(!readable(t.dev.epoll_fd()));
        t.dev.accept_error = None;
        t.dev.sweep(Instant::now());
        t.dev.handle_host_events();
        assert_eq!(t.dev.connection_count(), 2);
        let req = t.dev.next_rx(&mut b).expect("REQUEST");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 53));
    }

    #[test]
    fn a_header_has_the_spec_layout_and_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 5000,
            len: 4096,
            type_: TYPE_SEQPACKET,
            op: OP_RW,
            flags: 1,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 3, "src_cid at 0");
        assert_eq!(b[8], 2, "dst_cid at 8");
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes(), "src_port at 16");
        assert_eq!(&b[24..28], &4096u32.to_le_bytes(), "len at 24");
        assert_eq!(&b[28..30], &TYPE_SEQPACKET.to_le_bytes(), "type at 28");
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes(), "op at 30");
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes(), "fwd_cnt at 40");
        assert_eq!(Header::from_bytes(&b), h);
    }
}
