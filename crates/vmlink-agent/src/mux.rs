//! The stream multiplexer that carries agent connections over virtio-serial (`docs/serial-mux.md`).
//!
//! A virtio-serial port is one byte pipe, and QEMU's chardev socket for it takes one client at
//! a time; the agent's protocol wants one connection per request. [`Mux`] runs many streams
//! over a *control* lane (one port) and an optional *data* lane (a second port): every frame
//! of the sans-IO format in [`vmlink_proto::mux`] goes on the control lane, except DATA frames
//! of more than [`SMALL_DATA`] bytes, which take the data lane once the peer has shown it has
//! one. DATA frames carry their byte offset and FIN carries the stream's length, so a stream's
//! frames may arrive over both lanes in any order and are put back in order.
//!
//! Each stream has its own credit window per direction: the receiver announces it in OPEN or
//! ACCEPT, [`MAX_WINDOW`] while the session's [`WINDOW_BUDGET`] lasts, else (and for peers
//! that announce nothing) [`WINDOW`]. A reader that stops reading stalls only its own stream,
//! never a lane, so a stalled 1 GiB copy never delays a ping. On the guest each stream is a
//! pair of in-process channels of whole buffers (`AsyncStream::in_memory_chunks`) that the
//! agent serves like any accepted connection; on the host, the client's own connection to the
//! bridge (`vmlink serial-bridge`, `vmlink lab up`).
//!
//! Threads: one reader and one writer task per lane, and two pump tasks per stream
//! (local socket -> frames, frames -> local socket).
//!
//! Trust: the peer is bounded, never trusted. A frame that breaks the format resets every
//! stream and resynchronises the lane (HELLO); a DATA frame beyond the window, more than
//! [`max_stashed`] buffers waiting, a CREDIT for bytes never sent or a second FIN resets its
//! stream; frames for unknown streams are dropped and counted; at most [`MAX_STREAMS`]
//! streams are open per session.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};
use vmlink_proto::mux::{
    frame, send_window, Event, Header, Kind, LaneDecoder, HEADER_LEN, MAX_DATA, MAX_WINDOW, WINDOW,
};

/// Streams open at once per session; one more is refused with RST.
pub const MAX_STREAMS: usize = 128;
/// DATA payloads up to this size stay on the control lane.
pub const SMALL_DATA: usize = 1024;
/// How long `open` waits for the peer's HELLO, and then for its ACCEPT.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// While streams are open, the host pings the guest this often...
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// ...and resets every stream when a ping stays unanswered this long: the agent died (its
/// port closed) while the guest lives on, and the guest sends the host no signal of that.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// A receiver returns credit every time it has consumed this much more (whatever its window:
/// a version-1 sender keeps to [`WINDOW`]).
const CREDIT_STEP: u64 = WINDOW / 4;
/// Per session and direction, the window beyond [`WINDOW`] that the open streams share: a
/// stream takes up to `MAX_WINDOW - WINDOW` of it when it opens and gives it back when it
/// ends, so four streams at a time get [`MAX_WINDOW`] and the rest [`WINDOW`]. A bigger window
/// keeps more of a copy in flight on a channel with a long round trip (under TCG, 1 MiB left
/// virtio-serial copies waiting for credit); the budget keeps what a session can be made to
/// buffer near what it was with 1 MiB windows alone.
pub const WINDOW_BUDGET: u64 = 4 * (MAX_WINDOW - WINDOW);
/// Per stream and direction, at most this many received buffers wait to be delivered for a
/// receive window of `window` bytes (4096 for [`WINDOW`]): small DATA frames that continue a
/// waiting buffer are appended to it, so a sender that keeps to its window needs at most
/// about `2 * window / SMALL_DATA` (every gap between waiting buffers is a DATA frame of more
/// than [`SMALL_DATA`] bytes still on the data lane). More is a credit violation: without it
/// a window of 1-byte frames would cost ~100 bytes each.
pub fn max_stashed(window: u64) -> usize {
    4 * (window as usize / SMALL_DATA)
}
/// How much a lane reader buffers.
const READ_BUF: usize = 256 * 1024;
/// Per stream and direction on the guest, at most this much waits in the in-process channel
/// between the session and the mux (in buffers of up to [`MAX_DATA`]). The credit window
/// bounds what waits beyond it.
const PIPE_BUF: usize = 256 * 1024;

/// A stream the host opened, as the guest's mux hands it to the agent: inbound bytes arrive
/// as the DATA payloads themselves (small ones that continue a waiting payload appended to
/// it), in order, and the session's replies go out as buffers that
/// become DATA frames as they are. [`Accepted::into_stream`] makes it an
/// [`vmlink_transport::AsyncStream`].
#[derive(Debug)]
pub struct Accepted {
    /// The stream's bytes from the host; closed at its FIN (or when it is reset).
    pub data: mpsc::Receiver<Vec<u8>>,
    /// Where the session's bytes go: each buffer is [`HEADER_LEN`] bytes of room for the
    /// frame header, then at most [`MAX_DATA`] bytes of payload. Dropping it sends FIN.
    pub out: mpsc::Sender<Vec<u8>>,
}

impl Accepted {
    /// The stream as a transport stream named `label`.
    pub fn into_stream(self, label: impl Into<String>) -> vmlink_transport::AsyncStream {
        let out = vmlink_transport::ChunkOut {
            tx: self.out,
            headroom: HEADER_LEN,
            max: MAX_DATA,
        };
        vmlink_transport::AsyncStream::in_memory_chunks(self.data, out, label)
    }
}

/// Where a stream's outbound bytes come from: the local socket (host), or the agent's session
/// as buffers with room for the header (guest; framed in place, so no copy).
enum Source<R> {
    Io(R),
    Chunks(mpsc::Receiver<Vec<u8>>),
}

/// Where a stream's inbound bytes go: the local socket (host), or the agent's session as whole
/// payloads (guest; no pipe between, so no copy).
enum Sink<W> {
    Io(W),
    Chunks(Option<mpsc::Sender<Vec<u8>>>),
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    async fn put(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        match self {
            Sink::Io(w) => w.write_all(&bytes).await,
            Sink::Chunks(Some(tx)) => tx.send(bytes).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the session is gone")
            }),
            Sink::Chunks(None) => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    async fn finish(&mut self) {
        match self {
            Sink::Io(w) => {
                let _ = w.shutdown().await;
            }
            Sink::Chunks(tx) => *tx = None,
        }
    }
}

/// A byte pipe's reading side.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// A byte pipe's writing side.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// One port, both directions.
pub struct Lane {
    /// Reads from the peer.
    pub r: BoxRead,
    /// Writes to the peer.
    pub w: BoxWrite,
}

impl Lane {
    /// A lane over a Unix socket (the host's end: QEMU's chardev socket).
    pub fn unix(s: UnixStream) -> Lane {
        let (r, w) = s.into_split();
        Lane {
            r: Box::new(r),
            w: Box::new(w),
        }
    }
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lane")
    }
}

/// Which end this is: the host opens streams, the guest accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams.
    Host,
    /// Accepts streams.
    Guest,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// No HELLO from the peer.
    #[error("no vmlink-agent answers on the serial port (no mux HELLO within {0:?})")]
    NoPeer(Duration),
    /// No ACCEPT.
    #[error("the agent did not accept the stream within {0:?}")]
    Timeout(Duration),
    /// The agent refused it.
    #[error("the agent refused the stream: {0}")]
    Refused(String),
    /// The session ended.
    #[error("the serial session ended")]
    Closed,
}

/// Why a stream's inbound frames were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    /// DATA overlapping delivered or waiting bytes.
    Overlap,
    /// DATA past the stream's length, or a FIN shorter than the bytes already received.
    BeyondFin,
    /// A second FIN.
    SecondFin,
    /// More than [`max_stashed`] buffers waiting.
    TooManyFrames,
}

impl Violation {
    fn reason(self) -> &'static str {
        match self {
            Violation::Overlap => "overlapping DATA",
            Violation::BeyondFin => "DATA beyond FIN",
            Violation::SecondFin => "a second FIN",
            Violation::TooManyFrames => "too many DATA frames waiting",
        }
    }
}

/// What the peer sent for one stream and the inbound pump has not taken yet: filled by the
/// lane readers, emptied in offset order by the pump.
#[derive(Debug)]
struct Reorder {
    /// Received bytes by offset, not overlapping; small frames that continue a buffer are
    /// appended to it (at most `max_stashed` buffers).
    stash: BTreeMap<u64, Vec<u8>>,
    /// [`max_stashed`] of the stream's receive window.
    max_stashed: usize,
    /// The pump has taken every byte before this offset.
    taken: u64,
    /// The stream's length, once its FIN arrived.
    fin: Option<u64>,
}

impl Reorder {
    /// An empty stream whose receive window is `window` bytes.
    fn new(window: u64) -> Reorder {
        Reorder {
            stash: BTreeMap::new(),
            max_stashed: max_stashed(window),
            taken: 0,
            fin: None,
        }
    }

    /// Takes DATA at `off`.
    fn data(&mut self, off: u64, bytes: Vec<u8>) -> Result<(), Violation> {
        // The codec refuses empty DATA; an empty buffer here would replace a waiting one.
        if bytes.is_empty() {
            return Err(Violation::Overlap);
        }
        let end = off.saturating_add(bytes.len() as u64);
        if self.fin.is_some_and(|total| end > total) {
            return Err(Violation::BeyondFin);
        }
        let after = self.stash.range(off..).next();
        if off < self.taken || after.is_some_and(|(&o, _)| o < end) {
            return Err(Violation::Overlap);
        }
        if let Some((&o, before)) = self.stash.range_mut(..off).next_back() {
            let before_end = o + before.len() as u64;
            if before_end > off {
                return Err(Violation::Overlap);
            }
            if before_end == off
                && bytes.len() <= SMALL_DATA
                && before.len() + bytes.len() <= MAX_DATA
            {
                before.extend_from_slice(&bytes);
                return Ok(());
            }
        }
        if self.stash.len() >= self.max_stashed {
            return Err(Violation::TooManyFrames);
        }
        self.stash.insert(off, bytes);
        Ok(())
    }

    /// Takes FIN: the stream is `total` bytes long.
    fn fin(&mut self, total: u64) -> Result<(), Violation> {
        if self.fin.is_some() {
            return Err(Violation::SecondFin);
        }
        // The stash does not overlap, so its last buffer ends last.
        let last_end = self
            .stash
            .last_key_value()
            .map(|(&o, b)| o + b.len() as u64);
        if total < self.taken || last_end.is_some_and(|e| e > total) {
            return Err(Violation::BeyondFin);
        }
        self.fin = Some(total);
        Ok(())
    }

    /// Whether the FIN has arrived and every byte before it has too (taken, or waiting with
    /// no gap).
    fn whole(&self) -> bool {
        let Some(total) = self.fin else {
            return false;
        };
        let mut at = self.taken;
        for (&off, bytes) in &self.stash {
            if off != at {
                return false;
            }
            at += bytes.len() as u64;
        }
        at == total
    }

    /// The next bytes in order, if they have arrived; `Err(())` once every byte up to the FIN
    /// has been taken.
    fn take(&mut self) -> Result<Option<Vec<u8>>, ()> {
        match self.stash.first_entry() {
            Some(e) if *e.key() == self.taken => {
                let bytes = e.remove();
                self.taken += bytes.len() as u64;
                Ok(Some(bytes))
            }
            _ if self.fin == Some(self.taken) => Err(()),
            _ => Ok(None),
        }
    }
}

struct Entry {
    /// Inbound frames waiting for the pump.
    inbound: Arc<Mutex<Reorder>>,
    /// Wakes the inbound pump; dropped (so the pump stops) when the stream is removed.
    wake: mpsc::Sender<()>,
    /// The peer's total consumed count and the window it allows (our send credit).
    credit: watch::Sender<Credit>,
    /// The window beyond [`WINDOW`] this stream took from the session's budgets: receiving
    /// (announced to the peer) and sending (the peer's announcement, once known). Dropped,
    /// so given back, when the stream is removed.
    grants: (Grant, Grant),
    /// Our receive window for the stream, as announced: [`WINDOW`] plus the receive grant.
    recv_window: u64,
    /// Bytes this side has queued for the peer (DATA offsets below it): a CREDIT beyond it
    /// is a credit violation.
    sent: Arc<AtomicU64>,
    /// The highest stream offset (exclusive) the peer may send: our consumed + recv_window.
    limit: Arc<AtomicU64>,
    /// Payload bytes accepted from the peer and not yet written out: at most recv_window for
    /// a peer that keeps to its credit, however it repeats or overlaps offsets.
    queued: Arc<AtomicU64>,
}

/// Counters, readable while the session runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames for streams that do not exist (late, or made up).
    pub unknown_stream: AtomicU64,
    /// Frames that broke the format (each resynchronised its lane), or the protocol of one
    /// stream (OPEN or ACCEPT the wrong way, a second FIN; that stream was reset).
    pub malformed: AtomicU64,
    /// Streams reset for credit violations: DATA beyond the window, more than a window (or
    /// [`max_stashed`] buffers) waiting, CREDIT for bytes never sent.
    pub credit_violations: AtomicU64,
    /// Streams opened.
    pub opened: AtomicU64,
    /// Replies (PONG, HELLO, refusing RST) not sent because the peer was not reading its
    /// control lane: more than [`MAX_QUEUED_REPLIES`] bytes of them were waiting.
    pub replies_dropped: AtomicU64,
}

/// The most bytes of replies the peer asked for (PONG, HELLO, a refused OPEN's RST) that may
/// wait for a peer that does not read its lanes; further ones are dropped and counted. Every
/// other frame the session queues is bounded by the streams' windows.
pub const MAX_QUEUED_REPLIES: usize = 1 << 20;

/// One frame for a lane's writer: the frame, how many of its bytes count as queued replies,
/// and for DATA the room it takes in the session's lane queues ([`MAX_QUEUED_DATA`]), given
/// back once the frame is written (or dropped with the lane).
type Queued = (Vec<u8>, usize, Option<OwnedSemaphorePermit>);

/// The most DATA bytes a session's lane queues hold, whichever streams they belong to: what
/// every stream's window allows at once. A stream that is reset leaves the frames it queued
/// behind, to be written in turn; they keep their room until then, so a peer that stops
/// reading its lanes and resets stream after stream cannot make this side queue more.
pub const MAX_QUEUED_DATA: usize = MAX_STREAMS * WINDOW as usize + WINDOW_BUDGET as usize;

/// A sender's view of one stream's credit: it may send up to `consumed + window`.
#[derive(Debug, Clone, Copy)]
struct Credit {
    /// The peer's last CREDIT.
    consumed: u64,
    /// The window the peer allows: [`WINDOW`] until (unless) it announces more.
    window: u64,
}

/// What is left of one of a session's window budgets ([`WINDOW_BUDGET`]).
#[derive(Debug, Clone)]
struct Budget(Arc<AtomicU64>);

impl Budget {
    fn new() -> Budget {
        Budget(Arc::new(AtomicU64::new(WINDOW_BUDGET)))
    }

    /// Takes up to `extra` bytes of window beyond [`WINDOW`], as much as is left.
    fn take(&self, extra: u64) -> Grant {
        let left = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left - left.min(extra))
            })
            .unwrap_or(0);
        Grant {
            extra: left.min(extra),
            budget: self.clone(),
        }
    }
}

/// Window taken from a [`Budget`]; given back when dropped.
#[derive(Debug)]
struct Grant {
    extra: u64,
    budget: Budget,
}

impl Grant {
    /// The window this grant makes.
    fn window(&self) -> u64 {
        WINDOW + self.extra
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.0.fetch_add(self.extra, Ordering::AcqRel);
    }
}

struct Session {
    role: Role,
    ctl: mpsc::UnboundedSender<Queued>,
    data: Option<mpsc::UnboundedSender<Queued>>,
    /// Reply bytes queued on the lanes (see [`MAX_QUEUED_REPLIES`]).
    replies: Arc<AtomicUsize>,
    /// The peer sent a HELLO on the data lane, so it reads it.
    data_ok: AtomicBool,
    streams: Mutex<HashMap<u32, Entry>>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Result<(), String>>>>,
    next_id: AtomicU32,
    peer_ready: watch::Sender<bool>,
    closed: watch::Sender<bool>,
    incoming: Option<mpsc::Sender<Accepted>>,
    counters: Counters,
    /// The nonce of the last PONG.
    pong: AtomicU64,
    /// Window beyond [`WINDOW`] left to announce to the peer (receiving) and to use for the
    /// peer's announcements (sending).
    recv_budget: Budget,
    send_budget: Budget,
    /// Room for DATA in the lane queues ([`MAX_QUEUED_DATA`] bytes).
    lane_room: Arc<Semaphore>,
}

/// A running session: lanes plus streams. Dropping it does not stop it; the session ends when
/// the control lane reaches EOF or fails ([`Mux::closed`]).
#[derive(Clone)]
pub struct Mux(Arc<Session>);

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("role", &self.0.role)
            .field("streams", &lock(&self.0.streams).len())
            .field("counters", &self.0.counters)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mux {
    /// Starts a session over `ctl` and an optional `data` lane. For [`Role::Guest`] the
    /// receiver yields one [`Accepted`] per stream the host opens (in-process, no socket pair:
    /// a copy's bytes cross no extra system calls or kernel copies inside the guest).
    pub fn start(role: Role, ctl: Lane, data: Option<Lane>) -> (Mux, mpsc::Receiver<Accepted>) {
        Mux::start_with_room(role, ctl, data, MAX_QUEUED_DATA)
    }

    /// [`Mux::start`] with `lane_room` bytes of room for DATA in the lane queues.
    fn start_with_room(
        role: Role,
        ctl: Lane,
        data: Option<Lane>,
        lane_room: usize,
    ) -> (Mux, mpsc::Receiver<Accepted>) {
        let (in_tx, in_rx) = mpsc::channel(64);
        let replies = Arc::new(AtomicUsize::new(0));
        let closed = watch::channel(false).0;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let lane_writer = |w, rx| {
            let shared = Writer {
                replies: replies.clone(),
                closed: closed.subscribe(),
            };
            writer(w, rx, shared)
        };
        tokio::spawn(lane_writer(ctl.w, ctl_rx));
        let data_tx = data.map(|d| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(lane_writer(d.w, rx));
            (tx, d.r)
        });
        let session = Arc::new(Session {
            role,
            ctl: ctl_tx,
            data: data_tx.as_ref().map(|(tx, _)| tx.clone()),
            replies,
            data_ok: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            peer_ready: watch::channel(false).0,
            closed,
            incoming: (role == Role::Guest).then_some(in_tx),
            counters: Counters::default(),
            pong: AtomicU64::new(0),
            recv_budget: Budget::new(),
            send_budget: Budget::new(),
            lane_room: Arc::new(Semaphore::new(lane_room)),
        });
        if role == Role::Host {
            tokio::spawn(keepalive(session.clone()));
        }
        session.send(false, Header::hello(false), &[]);
        if let Some((_, r)) = data_tx {
            session.send(true, Header::hello(false), &[]);
            tokio::spawn(reader(session.clone(), r, true));
        }
        tokio::spawn(reader(session.clone(), ctl.r, false));
        (Mux(session), in_rx)
    }

    /// Completes when the session has ended (the control lane closed or failed).
    pub async fn closed(&self) {
        let mut rx = self.0.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The session's counters.
    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    /// Host side: opens a stream to the agent and pumps `local` through it until both
    /// directions are done.
    pub async fn open(&self, local: UnixStream) -> Result<(), MuxError> {
        let s = &self.0;
        let mut ready = s.peer_ready.subscribe();
        let mut closed = s.closed.subscribe();
        tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, ready.wait_for(|r| *r)) => match r {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(MuxError::Closed),
                Err(_) => return Err(MuxError::NoPeer(OPEN_TIMEOUT)),
            },
            _ = closed.wait_for(|c| *c) => return Err(MuxError::Closed),
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&s.pending).insert(id, tx);
        // Until the ACCEPT announces the guest's window, this side sends within WINDOW.
        let recv = s.recv_budget.take(MAX_WINDOW - WINDOW);
        let announced = recv.window();
        let parts = s.register(id, recv, s.send_budget.take(0));
        let accepted = parts.accepted.clone();
        s.send(false, Header::new(Kind::Open, id, 0, announced), &[]);
        // Pump at once: until ACCEPT, DATA stays on the control lane behind the OPEN, so a
        // request costs no extra round trip. A refusal (RST) ends the pumps and the client
        // sees its connection close.
        s.clone().pump(id, local, parts);
        let answer = tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, rx) => match r {
                Ok(Ok(a)) => Some(a),
                Ok(Err(_)) => None,
                Err(_) => {
                    lock(&s.pending).remove(&id);
                    s.reset(id, "no ACCEPT in time");
                    return Err(MuxError::Timeout(OPEN_TIMEOUT));
                }
            },
            _ = closed.wait_for(|c| *c) => None,
        };
        match answer {
            Some(Ok(())) => accepted.store(true, Ordering::Release),
            Some(Err(reason)) => {
                lock(&s.streams).remove(&id);
                return Err(MuxError::Refused(reason));
            }
            None => {
                lock(&s.streams).remove(&id);
                return Err(MuxError::Closed);
            }
        }
        s.counters.opened.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The receiving ends a stream's pumps need.
struct Parts {
    inbound: Arc<Mutex<Reorder>>,
    wake: mpsc::Receiver<()>,
    credit: watch::Receiver<Credit>,
    /// Our receive window for the stream.
    recv_window: u64,
    sent: Arc<AtomicU64>,
    limit: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    halves: Arc<AtomicU32>,
    /// Whether DATA may take the data lane: the peer knows the stream (host: ACCEPT seen).
    accepted: Arc<AtomicBool>,
}

impl Session {
    /// Queues one frame on the control lane, or on the data lane when asked and possible.
    fn send(&self, data_lane: bool, h: Header, payload: &[u8]) {
        self.send_frame(data_lane, frame(h, payload));
    }

    /// Queues one encoded frame.
    fn send_frame(&self, data_lane: bool, f: Vec<u8>) {
        self.queue(data_lane, (f, 0, None));
    }

    /// Queues a reply the peer asked for on the control lane, unless more than
    /// [`MAX_QUEUED_REPLIES`] bytes of replies already wait there (a peer that does not read).
    fn reply(&self, data_lane: bool, h: Header, payload: &[u8]) {
        let f = frame(h, payload);
        let n = f.len();
        let room = self
            .replies
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= MAX_QUEUED_REPLIES).then_some(q + n)
            });
        if room.is_err() {
            self.counters
                .replies_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.queue(data_lane, (f, n, None));
    }

    fn queue(&self, data_lane: bool, q: Queued) {
        let lane = match &self.data {
            Some(d) if data_lane => d,
            _ => &self.ctl,
        };
        // A closed lane means the session is ending; the frame has nowhere to go.
        let _ = lane.send(q);
    }

    /// Registers stream `id`, which receives within `recv`'s window (announced to the peer)
    /// and sends within `send`'s (the peer's announcement, as far as the budget went).
    fn register(&self, id: u32, recv: Grant, send: Grant) -> Parts {
        let recv_window = recv.window();
        let reorder = Arc::new(Mutex::new(Reorder::new(recv_window)));
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let (credit_tx, credit_rx) = watch::channel(Credit {
            consumed: 0,
            window: send.window(),
        });
        let sent = Arc::new(AtomicU64::new(0));
        let limit = Arc::new(AtomicU64::new(recv_window));
        let queued = Arc::new(AtomicU64::new(0));
        let halves = Arc::new(AtomicU32::new(2));
        lock(&self.streams).insert(
            id,
            Entry {
                inbound: reorder.clone(),
                wake: wake_tx,
                credit: credit_tx,
                grants: (recv, send),
                recv_window,
                sent: sent.clone(),
                limit: limit.clone(),
                queued: queued.clone(),
            },
        );
        Parts {
            inbound: reorder,
            wake: wake_rx,
            credit: credit_rx,
            recv_window,
            sent,
            limit,
            queued,
            halves,
            accepted: Arc::new(AtomicBool::new(self.role == Role::Guest)),
        }
    }

    /// Aborts stream `id` on both sides.
    /// Counts `v` where it belongs (too many waiting frames: a credit violation; a second
    /// FIN: malformed; the rest: neither) and resets stream `id`.
    fn violated(&self, id: u32, v: Violation) {
        let counter = match v {
            Violation::TooManyFrames => Some(&self.counters.credit_violations),
            Violation::SecondFin => Some(&self.counters.malformed),
            Violation::Overlap | Violation::BeyondFin => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.reset(id, v.reason());
    }

    fn reset(&self, id: u32, reason: &str) {
        if lock(&self.streams).remove(&id).is_some() {
            debug!("mux stream {id} reset: {reason}");
            self.send_rst(id, reason);
        }
    }

    /// Sends RST for stream `id`, its reason cut to the frame's bound.
    fn send_rst(&self, id: u32, reason: &str) {
        let r = &reason.as_bytes()[..reason.len().min(vmlink_proto::mux::MAX_REASON)];
        self.send(false, Header::new(Kind::Rst, id, r.len() as u32, 0), r);
    }

    /// Refuses an OPEN: an RST the peer asked for, so a reply (bounded).
    fn refuse(&self, id: u32, reason: &str) {
        let r = &reason.as_bytes()[..reason.len().min(vmlink_proto::mux::MAX_REASON)];
        self.reply(false, Header::new(Kind::Rst, id, r.len() as u32, 0), r);
    }

    /// Ends the session: every stream reset, both lanes' readers and writers stopped (which
    /// closes the lanes), [`Mux::closed`] complete.
    fn end(&self, reason: &str) {
        self.reset_all(reason);
        self.closed.send_replace(true);
    }

    fn reset_all(&self, reason: &str) {
        let ids: Vec<u32> = lock(&self.streams).keys().copied().collect();
        for id in ids {
            self.reset(id, reason);
        }
        for (_, tx) in lock(&self.pending).drain() {
            let _ = tx.send(Err(reason.to_string()));
        }
    }

    fn half_done(&self, id: u32, halves: &AtomicU32) {
        if halves.fetch_sub(1, Ordering::AcqRel) == 1 {
            lock(&self.streams).remove(&id);
        }
    }

    fn pump<S: AsyncRead + AsyncWrite + Send + 'static>(
        self: Arc<Self>,
        id: u32,
        local: S,
        parts: Parts,
    ) {
        let (rd, wr) = tokio::io::split(local);
        self.pump_halves(id, Source::Io(rd), Sink::Io(wr), parts);
    }

    fn pump_halves<R, W>(self: Arc<Self>, id: u32, source: Source<R>, sink: Sink<W>, parts: Parts)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(outbound(
            self.clone(),
            id,
            source,
            parts.credit,
            parts.sent,
            parts.halves.clone(),
            parts.accepted,
        ));
        tokio::spawn(inbound(
            self,
            id,
            sink,
            parts.inbound,
            parts.wake,
            parts.recv_window,
            parts.limit,
            parts.queued,
            parts.halves,
        ));
    }

    /// Accepts stream `id`, whose host announced a receive window of `announced` bytes.
    fn accept(self: &Arc<Self>, id: u32, announced: u64) {
        let busy = {
            let streams = lock(&self.streams);
            streams.len() >= MAX_STREAMS || streams.contains_key(&id)
        };
        let reason = if busy {
            Some(format!("at most {MAX_STREAMS} streams per session"))
        } else {
            None
        };
        if let Some(r) = reason {
            return self.refuse(id, &r);
        }
        let (out, out_rx) = mpsc::channel((PIPE_BUF / MAX_DATA).max(1));
        let (data_tx, data) = mpsc::channel((PIPE_BUF / MAX_DATA).max(1));
        let Some(incoming) = &self.incoming else {
            return;
        };
        let recv = self.recv_budget.take(MAX_WINDOW - WINDOW);
        let window = recv.window();
        let send = self.send_budget.take(send_window(announced) - WINDOW);
        let parts = self.register(id, recv, send);
        if incoming.try_send(Accepted { data, out }).is_err() {
            lock(&self.streams).remove(&id);
            return self.refuse(id, "the agent is not accepting streams");
        }
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.send(false, Header::new(Kind::Accept, id, 0, window), &[]);
        self.clone().pump_halves(
            id,
            Source::<UnixStream>::Chunks(out_rx),
            Sink::<UnixStream>::Chunks(Some(data_tx)),
            parts,
        );
    }

    /// Handles one frame from lane `data_lane`.
    fn dispatch(self: &Arc<Self>, data_lane: bool, h: Header, payload: Vec<u8>) {
        let unknown = || {
            self.counters.unknown_stream.fetch_add(1, Ordering::Relaxed);
        };
        match h.kind {
            Kind::Hello => {
                if !h.is_reply() {
                    // A new agent session sends its HELLO(start) before any reply, so one that
                    // comes after the peer was ready is a restart: a new agent, or an agent
                    // session that missed the hang-up of this one's start and has just seen it.
                    let restarted = !data_lane && *self.peer_ready.borrow();
                    if restarted && self.role == Role::Host {
                        // The agent restarted while this session was on. Its lanes may have
                        // been left mid-frame both ways (a frame cut short, a HELLO swallowed
                        // into it), so the session ends: the bridge reconnects, the agent
                        // reads end of file, and both start afresh.
                        warn!("mux: the agent restarted; starting a new session");
                        self.end("the agent restarted");
                        return;
                    }
                    if !data_lane {
                        // The peer (re)started: whatever it had open is gone.
                        self.reset_all("the peer restarted");
                    }
                    self.reply(data_lane, Header::hello(true), &[]);
                }
                if data_lane {
                    self.data_ok.store(true, Ordering::Release);
                } else {
                    self.peer_ready.send_replace(true);
                }
            }
            Kind::Open if self.role == Role::Guest => self.accept(h.stream, h.arg),
            Kind::Ping => self.reply(false, Header::new(Kind::Pong, 0, 0, h.arg), &[]),
            Kind::Pong => self.pong.store(h.arg, Ordering::Release),
            Kind::Accept if self.role == Role::Host => {
                match lock(&self.pending).remove(&h.stream) {
                    Some(tx) => {
                        self.widen(h.stream, h.arg);
                        let _ = tx.send(Ok(()));
                    }
                    None => unknown(),
                }
            }
            Kind::Open | Kind::Accept => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.reset(h.stream, "OPEN and ACCEPT go one way only");
            }
            Kind::Data => {
                let streams = lock(&self.streams);
                let Some(e) = streams.get(&h.stream) else {
                    return unknown();
                };
                let end = h.arg.saturating_add(u64::from(h.len));
                let len = u64::from(h.len);
                // Beyond the window, or (with repeated or overlapping offsets) more bytes
                // waiting than the window holds.
                if end > e.limit.load(Ordering::Acquire)
                    || e.queued.fetch_add(len, Ordering::AcqRel) + len > e.recv_window
                {
                    drop(streams);
                    return self.credit_violation(h.stream, "DATA beyond the credit window");
                }
                let taken = lock(&e.inbound).data(h.arg, payload);
                self.took(streams, h.stream, taken);
            }
            Kind::Credit => {
                let streams = lock(&self.streams);
                let Some(e) = streams.get(&h.stream) else {
                    return unknown();
                };
                // Credit for bytes never sent would let this side queue without bound.
                if h.arg > e.sent.load(Ordering::Acquire) {
                    drop(streams);
                    return self.credit_violation(h.stream, "CREDIT for bytes never sent");
                }
                e.credit.send_if_modified(|c| {
                    let more = h.arg > c.consumed;
                    c.consumed = c.consumed.max(h.arg);
                    more
                });
            }
            Kind::Fin => {
                let streams = lock(&self.streams);
                let Some(e) = streams.get(&h.stream) else {
                    return unknown();
                };
                let taken = lock(&e.inbound).fin(h.arg);
                self.took(streams, h.stream, taken);
            }
            Kind::Rst => {
                let reason = String::from_utf8_lossy(&payload).into_owned();
                if let Some(tx) = lock(&self.pending).remove(&h.stream) {
                    let _ = tx.send(Err(reason));
                }
                if lock(&self.streams).remove(&h.stream).is_some() {
                    debug!("mux stream {} reset by the peer", h.stream);
                }
            }
        }
    }
}

impl Session {
    /// After stream `id`'s reorder buffer took a DATA or FIN (`taken`): wakes its inbound
    /// pump, or resets the stream for the violation (with `streams` unlocked first).
    fn took(
        &self,
        streams: MutexGuard<'_, HashMap<u32, Entry>>,
        id: u32,
        taken: Result<(), Violation>,
    ) {
        match taken {
            Ok(()) => {
                if let Some(e) = streams.get(&id) {
                    let _ = e.wake.try_send(());
                }
            }
            Err(v) => {
                drop(streams);
                self.violated(id, v);
            }
        }
    }

    /// Counts a credit violation on stream `id` and resets it for `reason`.
    fn credit_violation(&self, id: u32, reason: &str) {
        self.counters
            .credit_violations
            .fetch_add(1, Ordering::Relaxed);
        self.reset(id, reason);
    }

    /// Host side, at ACCEPT: stream `id` may send within the window the guest announced
    /// (`arg`), as far as the session's send budget goes.
    fn widen(&self, id: u32, announced: u64) {
        let mut streams = lock(&self.streams);
        let Some(e) = streams.get_mut(&id) else {
            return;
        };
        let grant = self.send_budget.take(send_window(announced) - WINDOW);
        let window = grant.window();
        e.grants.1 = grant;
        e.credit.send_modify(|c| c.window = window);
    }
}

/// Host side: while streams are open, PING every [`KEEPALIVE`]; reset them all when a PING
/// stays unanswered for [`DEAD_AFTER`].
async fn keepalive(s: Arc<Session>) {
    let mut closed = s.closed.subscribe();
    let mut nonce = 0u64;
    let mut sent_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(KEEPALIVE) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let busy = !lock(&s.streams).is_empty() || !lock(&s.pending).is_empty();
        match sent_at {
            Some(_) if s.pong.load(Ordering::Acquire) == nonce => sent_at = None,
            Some(at) if at.elapsed() >= DEAD_AFTER => {
                // The streams are reset; the session goes on. (Ending it here would be no cure
                // for a paused VM: QEMU drops what it had not yet handed the guest when the
                // bridge hangs up, which can leave the guest inside a frame, and a paused guest
                // misses the hang-up.)
                warn!("mux: no answer from the agent for {DEAD_AFTER:?}; resetting its streams");
                s.reset_all(&format!("no answer from the agent for {DEAD_AFTER:?}"));
                sent_at = None;
            }
            _ => {}
        }
        if busy && sent_at.is_none() {
            nonce += 1;
            s.send(false, Header::new(Kind::Ping, 0, 0, nonce), &[]);
            sent_at = Some(tokio::time::Instant::now());
        }
    }
}

/// Writes queued frames, coalescing what is already queued into one write. A DATA frame's
/// lane room is given back once it is written.
/// What a lane writer shares with its session.
struct Writer {
    /// Reply bytes queued (see [`MAX_QUEUED_REPLIES`]).
    replies: Arc<AtomicUsize>,
    /// The session has ended.
    closed: watch::Receiver<bool>,
}

async fn writer(mut w: BoxWrite, mut rx: mpsc::UnboundedReceiver<Queued>, shared: Writer) {
    let Writer {
        replies,
        mut closed,
    } = shared;
    let mut batch = Vec::with_capacity(READ_BUF);
    let mut rooms = Vec::new();
    // An ended session writes no more frames, so the lane closes.
    let mut ended = closed.clone();
    loop {
        let next = tokio::select! {
            biased;
            _ = ended.wait_for(|c| *c) => None,
            q = rx.recv() => q,
        };
        let Some((f, counted, room)) = next else {
            return;
        };
        if f.len() >= READ_BUF / 8 {
            // Big enough on its own: write it without copying it into the batch.
            if let Err(e) = write_whole(&mut w, &f, &mut closed).await {
                debug!("mux lane write failed: {e}");
                return;
            }
            replies.fetch_sub(counted, Ordering::AcqRel);
            drop(room);
            continue;
        }
        batch.extend_from_slice(&f);
        rooms.extend(room);
        let mut released = counted;
        while batch.len() < READ_BUF {
            match rx.try_recv() {
                Ok((f, counted, room)) => {
                    batch.extend_from_slice(&f);
                    rooms.extend(room);
                    released += counted;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = write_whole(&mut w, &batch, &mut closed).await {
            debug!("mux lane write failed: {e}");
            return;
        }
        replies.fetch_sub(released, Ordering::AcqRel);
        batch.clear();
        rooms.clear();
    }
}

/// Writes `buf` (whole frames) to a lane. A frame is never cut short: a peer left inside one
/// would take the next session's HELLO for its payload. Once the session has ended, a write
/// the peer does not take within [`END_WRITE_GRACE`] is given up (the lane is dead anyway).
async fn write_whole(
    w: &mut BoxWrite,
    buf: &[u8],
    closed: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let write = w.write_all(buf);
    tokio::pin!(write);
    tokio::select! {
        r = &mut write => return r,
        _ = closed.wait_for(|c| *c) => {}
    }
    tokio::time::timeout(END_WRITE_GRACE, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the session ended and the peer took no more",
            ))
        })
}

/// How long the bridge waits after a session ended before it connects again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// How long a lane write that was under way when its session ended may still take.
const END_WRITE_GRACE: Duration = Duration::from_secs(5);

/// Reads one lane: resynchronises on HELLO, decodes frames, dispatches them.
async fn reader(s: Arc<Session>, mut r: BoxRead, data_lane: bool) {
    let lane = if data_lane { "data" } else { "control" };
    let mut decoder = LaneDecoder::new();
    let mut closed = s.closed.subscribe();
    loop {
        while let Some(event) = decoder.next_event() {
            match event {
                Event::Frame(h, payload) => s.dispatch(data_lane, h, payload),
                Event::Skipped(n) => debug!("mux {lane} lane: skipped {n} bytes before HELLO"),
                Event::Malformed(e) => {
                    s.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    warn!("mux {lane} lane: {e}; resetting every stream and resynchronising");
                    s.reset_all(&format!("malformed frame on the {lane} lane"));
                    s.send(data_lane, Header::hello(false), &[]);
                }
            }
        }
        // Straight into the decoder's buffer, or into a big frame's own payload buffer: the
        // lanes' readers (vmlink's transport, tokio's sockets) fill uninitialised memory
        // without zeroing it first.
        let (target, max) = decoder.read_target(READ_BUF);
        let mut limited = target.limit(max);
        let read = tokio::select! {
            r = r.read_buf(&mut limited) => r,
            // The session ended (see `Session::end`): stop reading, which closes the lane.
            _ = closed.wait_for(|c| *c) => break,
        };
        match read {
            Ok(0) => {
                debug!("mux {lane} lane: end of file");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                debug!("mux {lane} lane: {e}");
                break;
            }
        }
    }
    // Either lane ending ends the session: frames on it are lost.
    s.reset_all(&format!("the {lane} lane closed"));
    s.closed.send_replace(true);
}

/// Local socket (or the session's buffers) -> DATA frames, within the peer's credit; FIN at EOF.
async fn outbound<R: AsyncRead + Unpin>(
    s: Arc<Session>,
    id: u32,
    source: Source<R>,
    mut credit: watch::Receiver<Credit>,
    total: Arc<AtomicU64>,
    halves: Arc<AtomicU32>,
    accepted: Arc<AtomicBool>,
) {
    let mut sent = 0u64;
    let mut rd = match source {
        Source::Io(rd) => rd,
        Source::Chunks(rx) => {
            return outbound_chunks(s, id, rx, credit, total, halves, accepted).await;
        }
    };
    loop {
        let window = window(&mut credit, sent);
        if window == 0 {
            if credit.changed().await.is_err() {
                return; // reset
            }
            continue;
        }
        let want = (window as usize).min(MAX_DATA);
        // Read straight into the frame, after room for its header: no copy.
        let mut f = Vec::with_capacity(HEADER_LEN + want);
        f.extend_from_slice(&[0u8; HEADER_LEN]);
        let read = {
            let mut room = (&mut f).limit(want);
            tokio::select! {
                r = rd.read_buf(&mut room) => Some(r),
                c = credit.changed() => match c {
                    Err(_) => return, // reset
                    Ok(()) => None,
                },
            }
        };
        let Some(r) = read else { continue };
        match r {
            Ok(0) => {
                s.send(false, Header::new(Kind::Fin, id, 0, sent), &[]);
                s.half_done(id, &halves);
                return;
            }
            Ok(n) => {
                let Some(room) = lane_room(&s, n, &mut credit).await else {
                    return; // reset
                };
                send_data(&s, id, f, sent, &total, &accepted, room);
                sent += n as u64;
            }
            Err(e) => {
                s.reset(id, &format!("local read: {e}"));
                return;
            }
        }
    }
}

/// [`outbound`] for the guest's sessions: each buffer (header room, then at most [`MAX_DATA`]
/// bytes) becomes one DATA frame as it is, once the peer's credit covers it.
async fn outbound_chunks(
    s: Arc<Session>,
    id: u32,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut credit: watch::Receiver<Credit>,
    total: Arc<AtomicU64>,
    halves: Arc<AtomicU32>,
    accepted: Arc<AtomicBool>,
) {
    let mut sent = 0u64;
    loop {
        let f = tokio::select! {
            f = rx.recv() => f,
            c = credit.changed() => match c {
                Err(_) => return, // reset
                Ok(()) => continue,
            },
        };
        let Some(f) = f else {
            s.send(false, Header::new(Kind::Fin, id, 0, sent), &[]);
            s.half_done(id, &halves);
            return;
        };
        let n = f.len().saturating_sub(HEADER_LEN);
        if f.len() < HEADER_LEN || n > MAX_DATA {
            s.reset(id, "a session buffer without header room, or too long");
            return;
        }
        // A buffer is at most MAX_DATA, far less than the window: wait until it fits whole.
        while window(&mut credit, sent) < n as u64 {
            if credit.changed().await.is_err() {
                return; // reset
            }
        }
        let Some(room) = lane_room(&s, n, &mut credit).await else {
            return; // reset
        };
        send_data(&s, id, f, sent, &total, &accepted, room);
        sent += n as u64;
    }
}

/// Room for `n` bytes of DATA in the session's lane queues, once there is some; `None` if the
/// stream is reset meanwhile (its credit sender is gone).
async fn lane_room(
    s: &Session,
    n: usize,
    credit: &mut watch::Receiver<Credit>,
) -> Option<OwnedSemaphorePermit> {
    // n is at most MAX_DATA.
    let acquire = s.lane_room.clone().acquire_many_owned(n as u32);
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            p = &mut acquire => return p.ok(),
            c = credit.changed() => c.ok()?,
        }
    }
}

/// How many bytes past `sent` the peer's credit allows. The peer's CREDIT never exceeds what
/// was sent (a larger one resets the stream), so this is at most [`MAX_WINDOW`].
fn window(credit: &mut watch::Receiver<Credit>, sent: u64) -> u64 {
    let c = *credit.borrow_and_update();
    c.consumed.saturating_add(c.window).saturating_sub(sent)
}

/// Fills in the header of DATA frame `f` (header room, then the payload) at offset `sent` and
/// queues it with its lane `room`: on the data lane when it is big and the peer can take it
/// there. `total` learns the stream's new length first, so no CREDIT for these bytes can
/// arrive before it.
fn send_data(
    s: &Session,
    id: u32,
    mut f: Vec<u8>,
    sent: u64,
    total: &AtomicU64,
    accepted: &AtomicBool,
    room: OwnedSemaphorePermit,
) {
    let n = f.len() - HEADER_LEN;
    total.store(sent + n as u64, Ordering::Release);
    let big =
        n > SMALL_DATA && s.data_ok.load(Ordering::Acquire) && accepted.load(Ordering::Acquire);
    f[..HEADER_LEN].copy_from_slice(&Header::new(Kind::Data, id, n as u32, sent).encode());
    s.queue(big, (f, 0, Some(room)));
}

/// Inbound frames -> local socket, in offset order; returns credit; half-closes at FIN. The
/// lane readers check and order the frames ([`Reorder`]); this only delivers them.
#[allow(clippy::too_many_arguments)]
async fn inbound<W: AsyncWrite + Unpin>(
    s: Arc<Session>,
    id: u32,
    mut sink: Sink<W>,
    reorder: Arc<Mutex<Reorder>>,
    mut wake: mpsc::Receiver<()>,
    recv_window: u64,
    limit: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    halves: Arc<AtomicU32>,
) {
    let mut expected = 0u64;
    let mut credited = 0u64;
    loop {
        let next = lock(&reorder).take();
        match next {
            Ok(Some(bytes)) => {
                let n = bytes.len() as u64;
                // A reset (the wake channel closes) ends a write that the local side is not
                // taking, so the stream's waiting buffers go with it, unless they are whole:
                // every byte up to a FIN that has arrived (an exec's output and exit status,
                // before the peer reset its other direction) is still delivered. A wake-up
                // taken here is not lost: the loop looks at the buffers again before it waits.
                let put = sink.put(bytes);
                tokio::pin!(put);
                let mut watching = true;
                let put = loop {
                    tokio::select! {
                        r = &mut put => break r,
                        w = wake.recv(), if watching => if w.is_none() {
                            if !lock(&reorder).whole() {
                                return; // reset
                            }
                            watching = false;
                        },
                    }
                };
                if let Err(e) = put {
                    return s.reset(id, &format!("local write: {e}"));
                }
                expected += n;
                queued.fetch_sub(n, Ordering::AcqRel);
                limit.store(expected + recv_window, Ordering::Release);
                if expected - credited >= CREDIT_STEP {
                    s.send(false, Header::new(Kind::Credit, id, 0, expected), &[]);
                    credited = expected;
                }
            }
            Ok(None) => {
                if wake.recv().await.is_none() {
                    return; // reset
                }
            }
            Err(()) => {
                sink.finish().await;
                s.half_done(id, &halves);
                return;
            }
        }
    }
}

/// The host side of a virtio-serial agent: connects to QEMU's chardev sockets for the
/// control (and data) port and serves every connection accepted on `listener` as one stream
/// to the agent. When QEMU goes away (or restarts with `reconnect`), the bridge reconnects;
/// connections that arrive meanwhile wait in the listen queue. Returns when `shutdown` does.
pub async fn serve_bridge(
    ctl: std::path::PathBuf,
    data: Option<std::path::PathBuf>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let connect = |path: std::path::PathBuf| async move {
        let mut delay = Duration::from_millis(20);
        let mut said = false;
        loop {
            match UnixStream::connect(&path).await {
                Ok(s) => {
                    if said {
                        info!("serial bridge: connected to {}", path.display());
                    }
                    return s;
                }
                // Said once (a wrong path or a QEMU that is not running shows at once), then
                // retried quietly: QEMU may be starting or restarting.
                Err(e) if !said => {
                    warn!(
                        "serial bridge: cannot connect to {}: {e}; retrying until it can",
                        path.display()
                    );
                    said = true;
                }
                Err(e) => debug!("{}: {e}; retrying in {delay:?}", path.display()),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    };
    loop {
        let lanes = async {
            let c = connect(ctl.clone()).await;
            let d = match &data {
                Some(p) => Some(connect(p.clone()).await),
                None => None,
            };
            (c, d)
        };
        let (c, d) = tokio::select! {
            l = lanes => l,
            _ = &mut shutdown => return,
        };
        let (session, _) = Mux::start(Role::Host, Lane::unix(c), d.map(Lane::unix));
        debug!("serial bridge connected to {}", ctl.display());
        loop {
            tokio::select! {
                a = listener.accept() => match a {
                    Ok((conn, _)) => {
                        let s = session.clone();
                        tokio::spawn(async move {
                            if let Err(e) = s.open(conn).await {
                                // The client sees its connection close; say why here.
                                warn!("serial bridge: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        warn!("serial bridge: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = session.closed() => break,
                _ = &mut shutdown => return,
            }
        }
        warn!(
            "serial bridge: the session on {} ended; reconnecting",
            ctl.display()
        );
        // A running agent then reads the hang-up (QEMU tells the guest at once) and starts a
        // session of its own, instead of seeing the port close and open again as one event and
        // carrying on with whatever its readers were in the middle of.
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn lanes() -> (Lane, Lane) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (Lane::unix(a), Lane::unix(b))
    }

    /// A host and a guest session over socketpairs; the guest echoes every stream.
    fn pair(data: bool) -> (Mux, Mux) {
        pair_with_room(data, MAX_QUEUED_DATA)
    }

    /// [`pair`] with `room` bytes of lane room on each side.
    fn pair_with_room(data: bool, room: usize) -> (Mux, Mux) {
        let (hc, gc) = lanes();
        let (hd, gd) = if data {
            let (h, g) = lanes();
            (Some(h), Some(g))
        } else {
            (None, None)
        };
        let (host, _) = Mux::start_with_room(Role::Host, hc, hd, room);
        let (guest, mut incoming) = Mux::start_with_room(Role::Guest, gc, gd, room);
        tokio::spawn(async move {
            while let Some(s) = incoming.recv().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s.into_stream("test"));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        (host, guest)
    }

    async fn open(host: &Mux) -> UnixStream {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let h = host.clone();
        tokio::spawn(async move { h.open(b).await.expect("open") });
        a
    }

    async fn echo(host: &Mux, len: usize) {
        let s = open(host).await;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.expect("write");
            w.shutdown().await.expect("half-close");
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
    }

    /// Waits (event-free: counters have no notification) until `cond` holds, for 20 s at most.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "never happened: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_pings_without_reading_gets_its_replies_dropped_not_queued() {
        let (hc, raw) = UnixStream::pair().expect("socketpair");
        let (host, _) = Mux::start(Role::Host, Lane::unix(hc), None);
        let (_never_read, mut w) = raw.into_split();
        w.write_all(&frame(Header::hello(false), &[]))
            .await
            .expect("hello");
        // 4 MiB of PONGs asked for, none read: the socket takes a few hundred KiB, the queue
        // at most MAX_QUEUED_REPLIES; the rest is dropped.
        let ping = frame(Header::new(Kind::Ping, 0, 0, 7), &[]);
        let pings: Vec<u8> = ping.repeat((4 << 20) / ping.len());
        w.write_all(&pings).await.expect("pings");
        until("replies dropped", || {
            host.counters().replies_dropped.load(Ordering::Relaxed) > 0
        })
        .await;
        let queued = host.0.replies.load(Ordering::Acquire);
        assert!(
            queued <= MAX_QUEUED_REPLIES,
            "{queued} bytes of replies queued"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_repeated_at_one_offset_resets_the_stream_not_a_growing_queue() {
        let (hc, raw) = UnixStream::pair().expect("socketpair");
        let (host, _) = Mux::start(Role::Host, Lane::unix(hc), None);
        let (mut r, mut w) = raw.into_split();
        w.write_all(&frame(Header::hello(false), &[]))
            .await
            .expect("hello");
        // A local client whose stream nobody on this side reads, with a send buffer smaller
        // than one DATA payload: the first frame's delivery blocks, and what the peer sends
        // after it waits in the session.
        let (_unread, local) = UnixStream::pair().expect("socketpair");
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt(2) on a socket this test owns, with a pointer to a c_int and its
        // size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&local),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::addr_of!(small).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_SNDBUF");
        let h = host.clone();
        tokio::spawn(async move { h.open(local).await });
        // The OPEN names the stream.
        let mut dec = LaneDecoder::new();
        let mut buf = vec![0u8; 4096];
        let id = loop {
            match dec.next_event() {
                Some(Event::Frame(h, _)) if h.kind == Kind::Open => break h.stream,
                Some(_) => continue,
                None => {
                    let n = r.read(&mut buf).await.expect("read");
                    assert!(n > 0, "no OPEN");
                    dec.push(&buf[..n]);
                }
            }
        };
        w.write_all(&frame(Header::new(Kind::Accept, id, 0, 0), &[]))
            .await
            .expect("accept");
        // The same 64 KiB at offset 0, 64 times: 4 MiB against a 1 MiB window.
        let chunk = vec![5u8; MAX_DATA];
        let data = frame(Header::new(Kind::Data, id, MAX_DATA as u32, 0), &chunk);
        for _ in 0..64 {
            w.write_all(&data).await.expect("data");
        }
        // The second copy overlaps the first, which waits for the local client: reset then.
        until("the stream reset", || {
            !lock(&host.0.streams).contains_key(&id)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_echo_over_one_and_two_lanes() {
        for data in [false, true] {
            let (host, guest) = pair(data);
            let mut tasks = Vec::new();
            for i in 0..20 {
                let h = host.clone();
                tasks.push(tokio::spawn(async move { echo(&h, i * 50_000 + 1).await }));
            }
            for t in tasks {
                t.await.expect("echo");
            }
            assert_eq!(guest.counters().opened.load(Ordering::Relaxed), 20);
            assert_eq!(host.counters().malformed.load(Ordering::Relaxed), 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_stream_does_not_block_another() {
        let (host, _guest) = pair(true);
        // Fill one stream: the guest echoes, nobody reads the echo.
        let stalled = open(&host).await;
        let (_keep_reading_side, mut w) = stalled.into_split();
        let filler = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            loop {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // Give the window time to fill, then a small echo must still be quick.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), echo(&host, 100))
            .await
            .expect("a small stream finished while another was stalled");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        filler.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_resets_streams_and_the_lane_resynchronises() {
        let (hc, gc) = lanes();
        let (host, _) = Mux::start(Role::Host, hc, None);
        // A guest side driven by hand: garbage, then HELLO, then a working session.
        let (_, mut incoming) = {
            let (mut raw_r, raw_w) = (gc.r, gc.w);
            let (tx_a, rx_a) = UnixStream::pair().expect("pair");
            // Forward host->guest bytes unchanged; prepend garbage guest->host.
            let (mut ar, mut aw) = tx_a.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut raw_r, &mut aw).await;
            });
            let mut raw_w = raw_w;
            raw_w
                .write_all(&[3, 0, 0, 0, 9, 9, 9])
                .await
                .expect("garbage");
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut ar, &mut raw_w).await;
            });
            Mux::start(Role::Guest, Lane::unix(rx_a), None)
        };
        tokio::spawn(async move {
            while let Some(s) = incoming.recv().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s.into_stream("test"));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        echo(&host, 300_000).await;
        assert_eq!(host.counters().malformed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_is_declared_dead_and_its_streams_reset() {
        use vmlink_proto::mux::{frame, Event, LaneDecoder};
        let (h, g) = UnixStream::pair().expect("pair");
        let (host, _) = Mux::start(Role::Host, Lane::unix(h), None);
        let (mut gr, mut gw) = g.into_split();
        gw.write_all(&frame(Header::hello(false), &[]))
            .await
            .expect("hello");
        let (mut client, local) = UnixStream::pair().expect("pair");
        let h2 = host.clone();
        let opened = tokio::spawn(async move { h2.open(local).await });
        // A guest that accepts the stream and then never says anything again.
        let mut dec = LaneDecoder::new();
        let mut buf = vec![0u8; 4096];
        'accept: loop {
            let n = gr.read(&mut buf).await.expect("read");
            assert!(n > 0, "the host closed its lane");
            dec.push(&buf[..n]);
            while let Some(e) = dec.next_event() {
                if let Event::Frame(h, _) = e {
                    if h.kind == Kind::Open {
                        let accept = Header::new(Kind::Accept, h.stream, 0, 0);
                        gw.write_all(&frame(accept, &[])).await.expect("accept");
                        break 'accept;
                    }
                }
            }
        }
        opened.await.expect("join").expect("opened");
        tokio::spawn(
            async move { while gr.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {} },
        );
        let mut one = [0u8; 1];
        let n = tokio::time::timeout(KEEPALIVE + DEAD_AFTER + KEEPALIVE, client.read(&mut one))
            .await
            .expect("the stream was reset once pings went unanswered")
            .expect("read");
        assert_eq!(n, 0, "the client sees its connection end");
    }

    /// Reads `r` to its end (the peer closed the lane), discarding what arrives.
    async fn until_lane_closed(r: &mut tokio::net::unix::OwnedReadHalf) {
        let mut buf = vec![0u8; 64 * 1024];
        while r.read(&mut buf).await.expect("read") > 0 {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_restarting_mid_session_ends_it_and_closes_the_lanes() {
        // The agent said HELLO, then says it again: it restarted, and may have left either
        // side inside a frame. The host ends the session (the bridge then reconnects).
        let (host, mut r, mut w) = host_with_raw_guest().await;
        until("the peer is ready", || *host.0.peer_ready.borrow()).await;
        w.write_all(&frame(Header::hello(false), &[]))
            .await
            .expect("hello again");
        tokio::time::timeout(Duration::from_secs(20), host.closed())
            .await
            .expect("the session ended");
        tokio::time::timeout(Duration::from_secs(20), until_lane_closed(&mut r))
            .await
            .expect("the lane closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_agent_that_reads_nothing_gets_its_streams_reset_not_its_session_ended() {
        // A paused VM: the lane fills, no PONG comes. Its streams are reset and the session goes
        // on: ending it would drop what QEMU had not handed the guest yet, maybe mid-frame, and
        // a paused guest misses the hang-up.
        let (host, _unread, mut w) = host_with_raw_guest().await;
        let mut client_r = upload_to_deaf_guest(&host, &mut w, 1).await;
        let mut buf = vec![0u8; 1024];
        let ended = tokio::time::timeout(KEEPALIVE * 2 + DEAD_AFTER, async {
            loop {
                match client_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the stream was reset");
        assert!(!*host.0.closed.borrow(), "the session ended");
    }

    /// A host session whose guest is the test itself: the host's HELLO is waiting on `r`, the
    /// guest's has been sent on `w`.
    async fn host_with_raw_guest() -> (
        Mux,
        tokio::net::unix::OwnedReadHalf,
        tokio::net::unix::OwnedWriteHalf,
    ) {
        host_with_raw_guest_and_room(MAX_QUEUED_DATA).await
    }

    /// [`host_with_raw_guest`] with `room` bytes of lane room (a guest that does not read the
    /// lane fills the socket's buffer, then the lane's writer waits).
    async fn host_with_raw_guest_and_room(
        room: usize,
    ) -> (
        Mux,
        tokio::net::unix::OwnedReadHalf,
        tokio::net::unix::OwnedWriteHalf,
    ) {
        let (hc, raw) = UnixStream::pair().expect("socketpair");
        let (host, _) = Mux::start_with_room(Role::Host, Lane::unix(hc), None, room);
        let (r, mut w) = raw.into_split();
        w.write_all(&frame(Header::hello(false), &[]))
            .await
            .expect("hello");
        (host, r, w)
    }

    /// Opens a stream on `host` whose client uploads without end, ACCEPTs it (announcing
    /// `MAX_WINDOW`) without reading the lane, and returns its id and the client's reader.
    async fn upload_to_deaf_guest(
        host: &Mux,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        id: u32,
    ) -> tokio::net::unix::OwnedReadHalf {
        let (client, local) = UnixStream::pair().expect("socketpair");
        let h = host.clone();
        tokio::spawn(async move { h.open(local).await });
        until("the stream registered", || {
            lock(&host.0.streams).contains_key(&id)
        })
        .await;
        w.write_all(&frame(Header::new(Kind::Accept, id, 0, MAX_WINDOW), &[]))
            .await
            .expect("accept");
        let (client_r, mut client_w) = client.into_split();
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            while client_w.write_all(&chunk).await.is_ok() {}
        });
        client_r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_streams_share_a_lane_room_of_one_frame_without_stalling() {
        // The least room a DATA frame fits in, and a little more: streams take turns at it.
        for room in [MAX_DATA, 3 * MAX_DATA + 1000] {
            let (host, _guest) = pair_with_room(true, room);
            let mut tasks = Vec::new();
            for i in 0..16 {
                let h = host.clone();
                tasks.push(tokio::spawn(async move { echo(&h, i * 100_003 + 1).await }));
            }
            let all = async {
                for t in tasks {
                    t.await.expect("echo");
                }
            };
            tokio::time::timeout(Duration::from_secs(60), all)
                .await
                .unwrap_or_else(|_| panic!("echoes stalled with {room} bytes of lane room"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_streams_queued_data_keeps_its_lane_room_until_it_is_written() {
        // Room for 3 MiB of DATA; the guest reads nothing and resets the stream once the
        // host has queued all it can.
        const ROOM: usize = 3 << 20;
        let (host, mut r, mut w) = host_with_raw_guest_and_room(ROOM).await;
        let _c1 = upload_to_deaf_guest(&host, &mut w, 1).await;
        let room = host.0.lane_room.clone();
        until("the lane room used up", || {
            room.available_permits() < MAX_DATA
        })
        .await;
        w.write_all(&frame(Header::new(Kind::Rst, 1, 0, 0), &[]))
            .await
            .expect("rst");
        until("the stream removed", || {
            !lock(&host.0.streams).contains_key(&1)
        })
        .await;
        // The reset stream's frames still wait on the lane, and still hold their room (all
        // but what the socket's buffer may have taken since), so a new stream cannot queue a
        // window of its own on top of them.
        let available = room.available_permits();
        assert!(
            available < ROOM / 2,
            "{available} of {ROOM} bytes of lane room back after the reset"
        );
        assert_eq!(host.0.send_budget.0.load(Ordering::Acquire), WINDOW_BUDGET);
        let _c2 = upload_to_deaf_guest(&host, &mut w, 2).await;
        // Once the guest reads, the room comes back and the second stream moves.
        tokio::spawn(async move {
            let mut b = vec![0u8; 256 * 1024];
            while r.read(&mut b).await.is_ok_and(|n| n > 0) {}
        });
        until("the second stream sends", || {
            lock(&host.0.streams)
                .get(&2)
                .is_some_and(|e| e.sent.load(Ordering::Acquire) >= 2 * MAX_DATA as u64)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_frees_what_waits_for_a_local_client_that_does_not_read() {
        let (host, mut r, mut w) = host_with_raw_guest().await;
        let mut dec = LaneDecoder::new();
        // The local client never reads: the host's inbound pump blocks writing to it.
        let (_client, local) = UnixStream::pair().expect("socketpair");
        let (id, window) =
            accepted_stream_announcing(&host, &mut dec, &mut r, &mut w, local, 0).await;
        tokio::spawn(async move { while next_frame(&mut dec, &mut r).await.is_some() {} });
        let mut wire = Vec::new();
        for i in 0..window / MAX_DATA as u64 {
            wire.extend(frame(
                Header::new(Kind::Data, id, MAX_DATA as u32, i * MAX_DATA as u64),
                &[3u8; MAX_DATA],
            ));
        }
        w.write_all(&wire).await.expect("a window of data");
        let stash = lock(&host.0.streams)[&id].inbound.clone();
        until("the pump stuck with buffers waiting", || {
            lock(&stash).stash.len() > 8
        })
        .await;
        w.write_all(&frame(Header::new(Kind::Rst, id, 0, 0), &[]))
            .await
            .expect("rst");
        // The pump lets go of the stream's buffers: only this test's handle is left.
        until("the waiting buffers dropped", || {
            Arc::strong_count(&stash) == 1
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_after_fin_still_delivers_the_whole_stream_to_a_slow_client() {
        // The guest's whole reply and its FIN, then RST (its agent stopped reading the
        // host's side, as after `exec -i` whose command exits without reading its stdin);
        // the client reads only after the reset.
        let (host, mut w, client, id) = accepted_stream_draining().await;
        let total = 16 * MAX_DATA as u64;
        let mut wire = Vec::new();
        for i in 0..16u64 {
            let off = i * MAX_DATA as u64;
            wire.extend(frame(
                Header::new(Kind::Data, id, MAX_DATA as u32, off),
                &[i as u8; MAX_DATA],
            ));
        }
        wire.extend(frame(Header::new(Kind::Fin, id, 0, total), &[]));
        wire.extend(frame(Header::new(Kind::Rst, id, 0, 0), &[]));
        w.write_all(&wire).await.expect("reply, fin, rst");
        until("the stream reset", || {
            !lock(&host.0.streams).contains_key(&id)
        })
        .await;
        let (mut cr, _cw) = client.into_split();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), cr.read_to_end(&mut got))
            .await
            .expect("the stream ended")
            .expect("read");
        assert_eq!(got.len() as u64, total, "bytes received before the RST");
        assert!(got
            .chunks(MAX_DATA)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    }

    /// The next frame the host sent, or None at EOF.
    async fn next_frame(
        dec: &mut LaneDecoder,
        r: &mut tokio::net::unix::OwnedReadHalf,
    ) -> Option<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match dec.next_event() {
                Some(Event::Frame(h, p)) => return Some((h, p)),
                Some(_) => continue,
                None => {
                    let n = r.read(&mut buf).await.expect("read");
                    if n == 0 {
                        return None;
                    }
                    dec.push(&buf[..n]);
                }
            }
        }
    }

    /// Opens a stream from `host` for `local`, ACCEPTs it as a version-1 guest (announcing no
    /// window) and returns its id.
    async fn accepted_stream(
        host: &Mux,
        dec: &mut LaneDecoder,
        r: &mut tokio::net::unix::OwnedReadHalf,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        local: UnixStream,
    ) -> u32 {
        accepted_stream_announcing(host, dec, r, w, local, 0)
            .await
            .0
    }

    /// A host with a raw guest and one accepted stream, whose lane frames from the host are read
    /// and dropped in the background; returns the host, the guest's write half, the stream's
    /// local client and its id.
    async fn accepted_stream_draining() -> (Mux, tokio::net::unix::OwnedWriteHalf, UnixStream, u32)
    {
        let (host, mut r, mut w) = host_with_raw_guest().await;
        let mut dec = LaneDecoder::new();
        let (client, local) = UnixStream::pair().expect("socketpair");
        let id = accepted_stream(&host, &mut dec, &mut r, &mut w, local).await;
        tokio::spawn(async move { while next_frame(&mut dec, &mut r).await.is_some() {} });
        (host, w, client, id)
    }

    /// [`accepted_stream`], ACCEPTing with a receive window of `window` (0: none); returns the
    /// stream's id and the host's receive window from its OPEN.
    async fn accepted_stream_announcing(
        host: &Mux,
        dec: &mut LaneDecoder,
        r: &mut tokio::net::unix::OwnedReadHalf,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        local: UnixStream,
        window: u64,
    ) -> (u32, u64) {
        let h = host.clone();
        tokio::spawn(async move { h.open(local).await });
        let open = loop {
            let (h, _) = next_frame(dec, r).await.expect("no OPEN");
            if h.kind == Kind::Open {
                break h;
            }
        };
        w.write_all(&frame(
            Header::new(Kind::Accept, open.stream, 0, window),
            &[],
        ))
        .await
        .expect("accept");
        (open.stream, open.arg)
    }

    /// Reads the peer's DATA for stream `id` until it reaches offset `limit`, then PINGs and
    /// reads on up to the PONG: panics if any DATA goes past `limit` meanwhile. `end` is the
    /// highest offset seen.
    async fn data_until(
        dec: &mut LaneDecoder,
        r: &mut tokio::net::unix::OwnedReadHalf,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        id: u32,
        limit: u64,
        end: &mut u64,
    ) {
        let mut pinged = false;
        loop {
            if *end >= limit && !pinged {
                w.write_all(&frame(Header::new(Kind::Ping, 0, 0, limit), &[]))
                    .await
                    .expect("ping");
                pinged = true;
            }
            let (h, p) = next_frame(dec, r).await.expect("eof");
            match h.kind {
                Kind::Data if h.stream == id => {
                    *end = (*end).max(h.arg + p.len() as u64);
                    assert!(*end <= limit, "DATA up to {end} past {limit}");
                }
                Kind::Pong if pinged && h.arg == limit => return,
                _ => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_host_sends_within_the_window_its_guest_announced_or_the_default() {
        // A version-1 guest announces nothing; a current one MAX_WINDOW; a bigger claim is
        // held to MAX_WINDOW.
        for (announced, window) in [
            (0, WINDOW),
            (MAX_WINDOW, MAX_WINDOW),
            (u64::MAX, MAX_WINDOW),
        ] {
            let (host, mut r, mut w) = host_with_raw_guest().await;
            let mut dec = LaneDecoder::new();
            let (client, local) = UnixStream::pair().expect("socketpair");
            // The local client uploads two of the largest windows (and never reads).
            let (_client_r, mut client_w) = client.into_split();
            let upload = tokio::spawn(async move {
                let chunk = vec![9u8; 64 * 1024];
                for _ in 0..2 * MAX_WINDOW / (64 * 1024) {
                    if client_w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let (id, _) =
                accepted_stream_announcing(&host, &mut dec, &mut r, &mut w, local, announced).await;
            // The host fills the window and stops there (nothing past it up to the PONG of a
            // PING sent once it was full); a CREDIT moves it on by as much.
            let mut end = 0u64;
            let mut credited = 0u64;
            for step in [0, 64 * 1024] {
                credited += step;
                if step > 0 {
                    w.write_all(&frame(Header::new(Kind::Credit, id, 0, credited), &[]))
                        .await
                        .expect("credit");
                }
                let limit = credited + window;
                let filled = tokio::time::timeout(
                    Duration::from_secs(20),
                    data_until(&mut dec, &mut r, &mut w, id, limit, &mut end),
                )
                .await;
                assert!(
                    filled.is_ok(),
                    "announced {announced}: the host stopped at {end} of {limit}"
                );
            }
            assert_eq!(host.counters().credit_violations.load(Ordering::Relaxed), 0);
            upload.abort();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_windows_come_from_a_session_budget_and_go_back_to_it() {
        let (host, mut r, mut w) = host_with_raw_guest().await;
        let mut dec = LaneDecoder::new();
        let big = (WINDOW_BUDGET / (MAX_WINDOW - WINDOW)) as usize;
        let mut open = Vec::new();
        let mut windows = Vec::new();
        for _ in 0..=big {
            let (client, local) = UnixStream::pair().expect("socketpair");
            let (id, window) =
                accepted_stream_announcing(&host, &mut dec, &mut r, &mut w, local, 0).await;
            open.push((id, client));
            windows.push(window);
        }
        let mut expected = vec![MAX_WINDOW; big];
        expected.push(WINDOW);
        assert_eq!(windows, expected, "the host's announced receive windows");
        // A stream that ends gives its share back.
        let (first, _) = open.remove(0);
        w.write_all(&frame(Header::new(Kind::Rst, first, 0, 0), &[]))
            .await
            .expect("rst");
        until("the reset stream removed", || {
            !lock(&host.0.streams).contains_key(&first)
        })
        .await;
        let (_client, local) = UnixStream::pair().expect("socketpair");
        let (_, window) =
            accepted_stream_announcing(&host, &mut dec, &mut r, &mut w, local, 0).await;
        assert_eq!(window, MAX_WINDOW);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_past_the_announced_window_resets_the_stream() {
        let (host, mut r, mut w) = host_with_raw_guest().await;
        let mut dec = LaneDecoder::new();
        let (_client, local) = UnixStream::pair().expect("socketpair");
        let (id, window) =
            accepted_stream_announcing(&host, &mut dec, &mut r, &mut w, local, 0).await;
        assert_eq!(window, MAX_WINDOW);
        tokio::spawn(async move { while next_frame(&mut dec, &mut r).await.is_some() {} });
        // The window's last byte is taken (it waits for the bytes before it); the next resets.
        let mut wire = frame(Header::new(Kind::Data, id, 1, window - 1), &[1]);
        wire.extend(frame(Header::new(Kind::Data, id, 1, window), &[1]));
        w.write_all(&wire).await.expect("data");
        until("the stream reset past its window", || {
            host.counters().credit_violations.load(Ordering::Relaxed) == 1
        })
        .await;
        // Had the first frame been refused, the second would have found no stream.
        assert_eq!(host.counters().unknown_stream.load(Ordering::Relaxed), 0);
        assert!(!lock(&host.0.streams).contains_key(&id));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_announces_its_window_and_keeps_to_the_default_for_a_host_that_announces_none()
    {
        let (gc, raw) = UnixStream::pair().expect("socketpair");
        let (_guest, mut incoming) = Mux::start(Role::Guest, Lane::unix(gc), None);
        let (mut r, mut w) = raw.into_split();
        let mut dec = LaneDecoder::new();
        let mut wire = frame(Header::hello(false), &[]);
        wire.extend(frame(Header::new(Kind::Open, 1, 0, 0), &[]));
        w.write_all(&wire).await.expect("hello, open");
        let accept = loop {
            let (h, _) = next_frame(&mut dec, &mut r).await.expect("no ACCEPT");
            if h.kind == Kind::Accept {
                break h;
            }
        };
        assert_eq!((accept.stream, accept.arg), (1, MAX_WINDOW));
        // The agent's side answers with 2 MiB; the guest sends 1 MiB of it, a version-1
        // host's window, and then the rest only as CREDIT allows.
        let stream = incoming.recv().await.expect("accepted");
        let out = stream.out.clone();
        let _keep = stream;
        tokio::spawn(async move {
            for _ in 0..2 * WINDOW as usize / MAX_DATA {
                let mut b = vec![0u8; HEADER_LEN];
                b.extend_from_slice(&[5u8; MAX_DATA]);
                if out.send(b).await.is_err() {
                    return;
                }
            }
        });
        let mut end = 0u64;
        data_until(&mut dec, &mut r, &mut w, 1, WINDOW, &mut end).await;
        w.write_all(&frame(
            Header::new(Kind::Credit, 1, 0, MAX_DATA as u64),
            &[],
        ))
        .await
        .expect("credit");
        data_until(
            &mut dec,
            &mut r,
            &mut w,
            1,
            WINDOW + MAX_DATA as u64,
            &mut end,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credit_for_bytes_never_sent_resets_the_stream_and_sends_no_more_than_a_window() {
        for bogus in [1u64 << 62, u64::MAX] {
            let (host, mut r, mut w) = host_with_raw_guest().await;
            let mut dec = LaneDecoder::new();
            let (client, local) = UnixStream::pair().expect("socketpair");
            // The local client uploads 4 MiB (and never reads).
            let (_client_r, mut client_w) = client.into_split();
            let upload = tokio::spawn(async move {
                let chunk = vec![9u8; 64 * 1024];
                for _ in 0..64 {
                    if client_w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let id = accepted_stream(&host, &mut dec, &mut r, &mut w, local).await;
            w.write_all(&frame(Header::new(Kind::Credit, id, 0, bogus), &[]))
                .await
                .expect("credit");
            // The guest reads everything the host sends until the RST: never more than the
            // window of DATA.
            let mut data = 0u64;
            let rst = tokio::time::timeout(Duration::from_secs(20), async {
                while let Some((h, p)) = next_frame(&mut dec, &mut r).await {
                    match h.kind {
                        Kind::Data if h.stream == id => {
                            data += p.len() as u64;
                            if data > WINDOW {
                                return false;
                            }
                        }
                        Kind::Rst if h.stream == id => return true,
                        _ => {}
                    }
                }
                false
            })
            .await;
            assert_eq!(
                rst,
                Ok(true),
                "CREDIT {bogus:#x}: no RST ({data} bytes of DATA)"
            );
            assert!(
                data <= WINDOW,
                "{data} bytes sent against a {WINDOW}-byte window"
            );
            assert_eq!(host.counters().credit_violations.load(Ordering::Relaxed), 1);
            assert!(!lock(&host.0.streams).contains_key(&id));
            upload.abort();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_of_one_byte_frames_after_fin_costs_neither_time_nor_buffers() {
        let (host, mut w, mut client, id) = accepted_stream_draining().await;
        // FIN first, then a whole window of 1-byte DATA frames, all but offset 0.
        let started = std::time::Instant::now();
        let mut wire = frame(Header::new(Kind::Fin, id, 0, WINDOW), &[]);
        for off in 1..WINDOW {
            wire.extend(frame(Header::new(Kind::Data, id, 1, off), &[off as u8]));
        }
        let sender = tokio::spawn(async move {
            w.write_all(&wire).await.expect("frames");
            w
        });
        let mut w = tokio::time::timeout(Duration::from_secs(60), sender)
            .await
            .expect("a window of 1-byte frames after FIN took more than a minute")
            .expect("sender");
        // The frames arrived in order after the gap: they wait as a few buffers, not 1M.
        until("every frame taken", || {
            lock(&host.0.streams)
                .get(&id)
                .is_some_and(|e| e.queued.load(Ordering::Acquire) == WINDOW - 1)
        })
        .await;
        let buffers = lock(&lock(&host.0.streams)[&id].inbound).stash.len();
        assert!(
            buffers <= 2 * (WINDOW as usize / MAX_DATA),
            "{buffers} buffers"
        );
        w.write_all(&frame(Header::new(Kind::Data, id, 1, 0), &[0]))
            .await
            .expect("offset 0");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut got))
            .await
            .expect("the stream ended")
            .expect("read");
        assert_eq!(got.len() as u64, WINDOW);
        assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert!(started.elapsed() < Duration::from_secs(60));
        assert_eq!(host.counters().credit_violations.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_frames_with_gaps_reset_the_stream_at_the_frame_bound() {
        let (host, mut w, _client, id) = accepted_stream_draining().await;
        // 1-byte frames at 1, 3, 5...: each waits on its own, so the count is what bounds them.
        let mut wire = Vec::new();
        for i in 0..=max_stashed(MAX_WINDOW) as u64 {
            wire.extend(frame(Header::new(Kind::Data, id, 1, 2 * i + 1), &[1]));
        }
        w.write_all(&wire).await.expect("frames");
        until("the stream reset at the frame bound", || {
            host.counters().credit_violations.load(Ordering::Relaxed) == 1
        })
        .await;
        assert!(!lock(&host.0.streams).contains_key(&id));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_fin_resets_the_stream() {
        // FIN(10) before any DATA: the stream waits for its 10 bytes, so the second FIN
        // finds it open.
        let (host, mut w, _client, id) = accepted_stream_draining().await;
        let mut wire = frame(Header::new(Kind::Fin, id, 0, 10), &[]);
        wire.extend(frame(Header::new(Kind::Fin, id, 0, 10), &[]));
        w.write_all(&wire).await.expect("fins");
        until("the stream reset at the second FIN", || {
            host.counters().malformed.load(Ordering::Relaxed) == 1
        })
        .await;
        assert!(!lock(&host.0.streams).contains_key(&id));
    }

    #[test]
    fn reorder_puts_frames_from_two_lanes_back_in_order_and_merges_small_ones() {
        let mut q = Reorder::new(WINDOW);
        // A big frame at 0 still on the data lane; small ones after it on the control lane.
        for off in 5000..5100u64 {
            q.data(off, vec![off as u8]).expect("small");
        }
        assert_eq!(q.stash.len(), 1, "contiguous small frames share a buffer");
        assert_eq!(q.take(), Ok(None), "offset 0 has not arrived");
        q.data(0, vec![7; 5000]).expect("big");
        q.fin(5100).expect("fin");
        let mut got = Vec::new();
        while let Ok(Some(b)) = q.take() {
            got.extend(b);
        }
        assert_eq!(got.len(), 5100);
        assert!(got[..5000].iter().all(|&b| b == 7));
        assert!(got[5000..]
            .iter()
            .zip(5000u64..)
            .all(|(&b, o)| b == o as u8));
        assert_eq!(q.take(), Err(()), "FIN reached");
        assert_eq!(q.fin(5100), Err(Violation::SecondFin));
        assert_eq!(q.data(5100, vec![1]), Err(Violation::BeyondFin));
        let mut q = Reorder::new(WINDOW);
        q.data(10, vec![1; 10]).expect("data");
        assert_eq!(q.data(15, vec![1]), Err(Violation::Overlap));
        assert_eq!(q.data(5, vec![1; 6]), Err(Violation::Overlap));
        assert_eq!(q.fin(15), Err(Violation::BeyondFin));
    }
}
