//! The thin vhost-user adapter: virtqueues in, [`Device`] calls out.
//!
//! `vhost-user-backend` runs the vhost-user protocol and the epoll loop; `virtio-queue` walks the
//! rings; `virtio-vsock` parses packets out of descriptor chains. This module only moves headers
//! and payloads between them and the device model. [`drain_tx`] and [`fill_rx`] work on a bare
//! [`Queue`], so that tests drive them through `virtio-queue`'s `MockSplitQueue`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::capture::Capture;
use crate::counters::{should_log, Counter, Counters};
use crate::device::{Device, Header, MAX_PKT_DATA};

/// The RX queue's index.
pub const RX_QUEUE: u16 = 0;
/// The TX queue's index.
pub const TX_QUEUE: u16 = 1;
/// The event queue's index (unused: no transport reset events are sent).
pub const EVT_QUEUE: u16 = 2;
/// Number of virtqueues of a vsock device.
pub const NUM_QUEUES: usize = 3;
/// The event id of the device's host-side epoll fd (ids up to `NUM_QUEUES` are reserved).
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Largest virtqueue offered.
pub const QUEUE_SIZE: usize = 1024;

/// The most one event's handling may spend polling in all (see [`VsockBackend::with_poll`]):
/// the backend's lock is held meanwhile, and the VMM's requests wait for it.
pub const POLL_BUDGET: Duration = Duration::from_millis(2);

/// `VIRTIO_VSOCK_F_SEQPACKET`.
pub const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1;

/// Takes every available TX chain, hands its packet to `device`, and returns it to the guest.
/// Returns how many descriptors were returned (0: none, the guest needs no notification).
pub fn drain_tx<M: GuestMemory>(
    device: &mut Device,
    queue: &mut Queue,
    mem: &M,
    buf: &mut Vec<u8>,
    capture: Option<&Capture>,
) -> usize {
    let mut used = 0;
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        if head >= queue.size() {
            // No descriptor has that index: nothing to parse, and nothing that can go back to the
            // guest (the used ring takes only valid heads; virtio-queue would log an error).
            device.count_malformed(&format_args!(
                "head index {head} is out of range (queue size {})",
                queue.size()
            ));
            continue;
        }
        // The chain's length in descriptors (the iterator stops after the queue size, so a
        // looping chain cannot make this spin): what the guest gets back below.
        used += chain.clone().count().max(1);
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA as u32) {
            Ok(pkt) => {
                let hdr = header_of(&pkt);
                let len = hdr.len as usize;
                if len == 0 {
                    if let Some(c) = capture {
                        c.packet(&hdr, &[]);
                    }
                    device.on_guest_packet(&hdr, &[]);
                } else if let Some(slice) = pkt.data_slice() {
                    if buf.len() < len {
                        buf.resize(len, 0);
                    }
                    let got = slice.len().min(len);
                    slice.copy_to(&mut buf[..got]);
                    if let Some(c) = capture {
                        c.packet(&hdr, &buf[..got]);
                    }
                    device.on_guest_packet(&hdr, &buf[..got]);
                } else {
                    device.count_malformed(&"header has a length but no data buffer");
                }
            }
            Err(e) => device.count_malformed(&e),
        }
        put_used(queue, mem, head, 0, "TX");
    }
    // Small packets of this pass, gathered per connection, go to the host now.
    device.flush_pending();
    used
}

/// Fills available RX chains with packets from `device` while it has some. Returns whether any
/// chain was used.
pub fn fill_rx<M: GuestMemory>(
    device: &mut Device,
    queue: &mut Queue,
    mem: &M,
    buf: &mut Vec<u8>,
    capture: Option<&Capture>,
) -> bool {
    fill_rx_pass(device, queue, mem, buf, capture).used
}

/// What one [`fill_rx`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RxPass {
    /// A chain went to the used ring.
    used: bool,
    /// A chain was taken and put back: the device had nothing to put in it now. Looking at the
    /// ring again at once would find the same chain.
    put_back: bool,
}

/// [`fill_rx`], telling also whether it stopped at a chain it put back.
fn fill_rx_pass<M: GuestMemory>(
    device: &mut Device,
    queue: &mut Queue,
    mem: &M,
    buf: &mut Vec<u8>,
    capture: Option<&Capture>,
) -> RxPass {
    let mut pass = RxPass::default();
    if buf.len() < MAX_PKT_DATA {
        buf.resize(MAX_PKT_DATA, 0);
    }
    while device.has_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        if head >= queue.size() {
            // No descriptor has that index: nothing can be written, nor given back.
            device.count_malformed_rx(&format_args!(
                "head index {head} is out of range (queue size {})",
                queue.size()
            ));
            continue;
        }
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA as u32) {
            Ok(p) => p,
            Err(e) => {
                device.count_malformed_rx(&e);
                put_used(queue, mem, head, 0, "RX");
                pass.used = true;
                continue;
            }
        };
        let slice = pkt.data_slice();
        let room = slice.as_ref().map_or(0, |s| s.len()).min(MAX_PKT_DATA);
        // The payload goes straight from the device's staging buffer into the guest's RX
        // buffer; a copy stays here only for the capture.
        let Some(hdr) = device.next_rx_with(room, &mut |data: &[u8]| {
            if let Some(s) = &slice {
                s.copy_from(data);
            }
            if capture.is_some() {
                buf[..data.len()].copy_from_slice(data);
            }
        }) else {
            if room == 0 {
                // Control packets fit in a header-only buffer and come first: only payload
                // waits, and this chain can never hold any. Put back, it would be taken again
                // at once, forever; it goes back to the guest unused instead.
                device.count_malformed_rx(&"no room for data after the header");
                put_used(queue, mem, head, 0, "RX");
                pass.used = true;
                continue;
            }
            queue.go_to_previous_position();
            pass.put_back = true;
            break;
        };
        set_header(&mut pkt, &hdr);
        let len = hdr.len as usize;
        if let Some(c) = capture {
            c.packet(&hdr, &buf[..len]);
        }
        put_used(queue, mem, head, (PKT_HEADER_SIZE + len) as u32, "RX");
        pass.used = true;
    }
    pass
}

/// `add_used` failures of every VM of this process, for rate-limiting their log lines.
static USED_RING_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Returns the chain at `head` to the guest with `len` bytes written. A failure (the guest's
/// used ring is not in its memory) is logged at a rate a guest cannot flood.
fn put_used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32, ring: &str) {
    if let Err(e) = queue.add_used(mem, head, len) {
        let n = USED_RING_ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
        if should_log(n) {
            warn!("cannot return a {ring} descriptor to the guest ({n} failures so far): {e}");
        }
    }
}

fn header_of<B: vm_memory::bitmap::BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    Header {
        src_cid: pkt.src_cid(),
        dst_cid: pkt.dst_cid(),
        src_port: pkt.src_port(),
        dst_port: pkt.dst_port(),
        len: pkt.len(),
        type_: pkt.type_(),
        op: pkt.op(),
        flags: pkt.flags(),
        buf_alloc: pkt.buf_alloc(),
        fwd_cnt: pkt.fwd_cnt(),
    }
}

fn set_header<B: vm_memory::bitmap::BitmapSlice>(pkt: &mut VsockPacket<'_, B>, h: &Header) {
    pkt.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
}

/// One VM's vhost-user-vsock backend: the [`Device`] behind `vhost-user-backend`.
#[derive(Debug)]
pub struct VsockBackend {
    device: Device,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: EventFd,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    capture: Option<Arc<Capture>>,
    event_idx: bool,
    /// TX descriptors returned to the guest since it was last notified about TX.
    tx_unsignalled: usize,
    /// How long to poll for more work after an event that moved packets.
    poll: Duration,
    /// The VMM negotiated features (it does on every start of the rings): the next time the
    /// rings are ready, see whether a new driver started them ([`VsockBackend::new_boot`]).
    started: bool,
}

impl VsockBackend {
    /// Wraps `device`.
    pub fn new(device: Device) -> io::Result<Self> {
        Ok(VsockBackend {
            device,
            mem: None,
            exit: EventFd::new(EFD_NONBLOCK)?,
            tx_buf: Vec::new(),
            rx_buf: Vec::new(),
            capture: None,
            event_idx: false,
            tx_unsignalled: 0,
            poll: Duration::ZERO,
            started: false,
        })
    }

    /// Whether the rings, just (re)started, belong to a new driver: every index of the RX and
    /// TX rings is 0. QEMU stops the rings (GET_VRING_BASE) when the guest resets the device
    /// (a reboot, a driver reset) and also when the VM is only paused; on the next start it
    /// sends SET_FEATURES, then each ring's base: the avail index the device had reached (0
    /// after a reset), and vhost-user-backend reads the used index from the guest's fresh ring
    /// (0 after a reset too). After a pause they are where they were, so connections stay.
    fn new_boot(rx: &VringRwLock, tx: &VringRwLock) -> bool {
        [rx, tx].iter().all(|v| {
            let state = v.get_ref();
            let q = state.get_queue();
            q.next_avail() == 0 && q.next_used() == 0
        })
    }

    /// After an event that moved packets, keep looking for the next one for up to `window`
    /// (restarted by each find, [`POLL_BUDGET`] in all) before going back to sleep: the guest's
    /// TX ring, its RX ring when packets wait for buffers, and the host side. A ping-pong then
    /// costs no wake-up of this thread, which on a virtualised host is tens of microseconds.
    /// `Duration::ZERO` (the default) never polls.
    pub fn with_poll(mut self, window: Duration) -> Self {
        self.poll = window;
        self
    }

    /// Writes every packet of this VM to `capture` while it is switched on.
    pub fn with_capture(mut self, capture: Option<Arc<Capture>>) -> Self {
        self.capture = capture;
        self
    }

    /// The device model.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The VM's counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.device.counters().clone()
    }

    /// Moves packets both ways. `tick`: the device's periodic tick came, so that TX
    /// descriptors returned without a notification are signalled now. `rearm_tx`: ask the
    /// guest to kick for TX again (EVENT_IDX); false while this thread polls the ring anyway.
    /// Returns whether a descriptor was used on either queue.
    fn process(&mut self, vrings: &[VringRwLock], tick: bool, rearm_tx: bool) -> bool {
        let Some(atomic) = &self.mem else {
            return false;
        };
        let mem = atomic.memory();
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE as usize), vrings.get(TX_QUEUE as usize))
        else {
            return false;
        };
        // A host event or the tick may come after the VMM stopped the rings (it is
        // disconnecting): leave them alone.
        if !rx.get_ref().get_queue().ready() || !tx.get_ref().get_queue().ready() {
            return false;
        }
        if std::mem::take(&mut self.started) && Self::new_boot(rx, tx) {
            // A reboot in the same vhost-user session: the old boot's connections are gone.
            // (On the first start this frees nothing: the guest had no connection yet, and
            // host requests not yet given to it are kept.)
            self.device.guest_restarted();
            self.tx_unsignalled = 0;
        }
        // TX first: guest packets (credit updates, RSTs) change what RX may send. With
        // EVENT_IDX, notifications are off while draining and the ring is looked at again after
        // turning them on, so that no kick is lost.
        let mut tx_used = 0;
        loop {
            if self.event_idx {
                let _ = tx.disable_notification();
            }
            tx_used += drain_tx(
                &mut self.device,
                tx.get_mut().get_queue_mut(),
                &*mem,
                &mut self.tx_buf,
                self.capture.as_deref(),
            );
            if !self.event_idx || !rearm_tx || !tx.enable_notification().unwrap_or(false) {
                break;
            }
        }
        // TX descriptors go back to the used ring at once, but the guest is interrupted for
        // them only once a quarter of the ring waits (or on the next tick): a TX interrupt
        // only lets the guest free buffers, and under a ping-pong it costs the guest an
        // interrupt and two work items per message, in the middle of the round trip. A guest
        // that fills its ring is always told before it runs out of descriptors.
        self.tx_unsignalled += tx_used;
        let tx_size = usize::from(tx.get_ref().get_queue().size());
        if self.tx_unsignalled > 0 && (tick || self.tx_unsignalled >= (tx_size / 4).max(1)) {
            notify(tx, "TX");
            self.tx_unsignalled = 0;
        }
        let mut rx_used = false;
        loop {
            if self.event_idx {
                let _ = rx.disable_notification();
            }
            let pass = fill_rx_pass(
                &mut self.device,
                rx.get_mut().get_queue_mut(),
                &*mem,
                &mut self.rx_buf,
                self.capture.as_deref(),
            );
            rx_used |= pass.used;
            // More buffers may have come while notifications were off: look again, but only
            // when there is something to put in them, and not when a chain was put back (the
            // ring always looks non-empty then: the device has nothing to send now, and the
            // next host event brings it).
            if !self.event_idx
                || !rx.enable_notification().unwrap_or(false)
                || pass.put_back
                || !self.device.has_rx()
            {
                break;
            }
        }
        if rx_used {
            notify(rx, "RX");
        }
        if let Some(c) = &self.capture {
            if (tx_used > 0 || rx_used) && c.enabled() {
                c.flush();
            }
        }
        tx_used > 0 || rx_used
    }

    /// Polls for work after an event (see [`VsockBackend::with_poll`]).
    fn poll_for_more(&mut self, vrings: &[VringRwLock]) {
        let (Some(atomic), Some(rx), Some(tx)) = (
            self.mem.clone(),
            vrings.get(RX_QUEUE as usize),
            vrings.get(TX_QUEUE as usize),
        ) else {
            return;
        };
        let start = Instant::now();
        let budget_end = start + POLL_BUDGET;
        let mut deadline = start + self.poll;
        let mut host = libc::pollfd {
            fd: self.device.epoll_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let mem = atomic.memory();
            // New descriptors: the avail index moved past what was taken.
            let fresh = |v: &VringRwLock| {
                let state = v.get_ref();
                let q = state.get_queue();
                q.ready()
                    && q.avail_idx(&*mem, Ordering::Acquire)
                        .is_ok_and(|i| i.0 != q.next_avail())
            };
            let guest = fresh(tx) || (self.device.has_rx() && fresh(rx));
            // SAFETY: one valid pollfd, and a zero timeout.
            let host_ready = unsafe { libc::poll(&mut host, 1, 0) } > 0;
            let now = Instant::now();
            if guest || host_ready {
                let tick = host_ready && self.device.handle_host_events();
                if self.process(vrings, tick, false) {
                    self.device.counters().inc(Counter::poll_hits);
                    deadline = now + self.poll;
                }
            }
            if now >= deadline || now >= budget_end {
                return;
            }
            // Give the CPU to any other thread that wants it (a vCPU, the peer we wait for):
            // polling must not slow down what it waits for.
            std::thread::yield_now();
        }
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Vring = VringRwLock;
    type Bitmap = ();

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_VSOCK_F_SEQPACKET)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn acked_features(&mut self, _features: u64) {
        self.started = true;
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.device.config().guest_cid.to_le_bytes();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= config.len() => config[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<EventFd> {
        self.exit.try_clone().ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never an error: an error stops the worker thread, and nothing a guest or a host
        // client does may stop the device.
        let mut tick = false;
        match device_event {
            RX_QUEUE | TX_QUEUE | EVT_QUEUE => {}
            HOST_EVENT => tick = self.device.handle_host_events(),
            other => warn!("unexpected event id {other}"),
        }
        // While this thread polls, the guest need not kick for TX: it would only wake the thread
        // once more, for nothing, and cost the guest an exit per packet. Kicks are asked for
        // again (and the ring looked at once more) before the thread sleeps.
        let polling = !self.poll.is_zero();
        if self.process(vrings, tick, !polling) && polling {
            self.poll_for_more(vrings);
        }
        if polling && self.event_idx {
            self.process(vrings, false, true);
        }
        Ok(())
    }
}

/// Interrupts the guest for `vring` unless EVENT_IDX says it does not want it yet.
fn notify(vring: &VringRwLock, name: &str) {
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            warn!("cannot notify the guest ({name}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vhost_user_backend::VringT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::device::{DeviceConfig, HOST_CID, OP_REQUEST, TYPE_STREAM};

    /// A backend whose device has one open guest connection, and its three rings, ready, every
    /// index at `idx` (the guest has nothing new on them). Start with `start` (the VMM
    /// negotiated features: the rings were (re)started).
    fn restarted(name: &str, idx: u16, start: bool) -> usize {
        let dir = std::env::temp_dir().join(format!(
            "vmlink-vhost-backend-{name}-{}",
            std::process::id()
        ));
        let (device, _, l) = device_with_a_connection(&dir);
        let _host = l.accept().expect("accept");
        assert_eq!(device.connection_count(), 1);

        let mut backend = VsockBackend::new(device).expect("backend");
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory"),
        );
        backend.update_memory(mem.clone()).expect("memory");
        let vrings: Vec<VringRwLock> = (0..NUM_QUEUES as u64)
            .map(|i| {
                let v = VringRwLock::new(mem.clone(), 256).expect("vring");
                let base = i * 0x1_0000;
                v.set_queue_info(base, base + 0x1000, base + 0x2000)
                    .expect("queue addresses");
                mem.memory()
                    .write_obj(idx, GuestAddress(base + 0x1000 + 2))
                    .expect("avail idx");
                mem.memory()
                    .write_obj(idx, GuestAddress(base + 0x2000 + 2))
                    .expect("used idx");
                v.set_queue_next_avail(idx);
                v.set_queue_next_used(idx);
                v.set_queue_ready(true);
                v
            })
            .collect();
        if start {
            backend.acked_features(backend.features());
        }
        backend
            .handle_event(HOST_EVENT, EventSet::IN, &vrings, 0)
            .expect("handled");
        let n = backend.device().connection_count();
        drop(backend);
        let _ = std::fs::remove_dir_all(&dir);
        n
    }

    #[test]
    fn rings_restarted_by_a_new_driver_free_the_old_boots_connections() {
        assert_eq!(
            restarted("reboot", 0, true),
            0,
            "a reboot: every index back at 0"
        );
        assert_eq!(
            restarted("resume", 7, true),
            1,
            "a pause: the rings go on where they were"
        );
        assert_eq!(restarted("running", 0, false), 1, "no restart");
    }

    /// Descriptor flags.
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    /// Guest addresses of the RX ring (queue size 256) and of its buffers.
    const RX_DESC: u64 = 0;
    const RX_AVAIL: u64 = 0x1000;
    const RX_USED: u64 = 0x2000;
    const RX_BUFS: u64 = 0x8_0000;

    /// Makes `chain` (address, length, flags) available on the RX ring, its descriptors from
    /// `first` on, and returns its head.
    fn offer_rx(mem: &GuestMemoryMmap, first: u16, chain: &[(u64, u32, u16)]) -> u16 {
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let at = RX_DESC + 16 * u64::from(first + i as u16);
            let next = first + i as u16 + 1;
            let flags = if i + 1 < chain.len() {
                flags | F_NEXT
            } else {
                flags
            };
            mem.write_obj(addr, GuestAddress(at)).expect("desc addr");
            mem.write_obj(len, GuestAddress(at + 8)).expect("desc len");
            mem.write_obj(flags, GuestAddress(at + 12))
                .expect("desc flags");
            mem.write_obj(next, GuestAddress(at + 14))
                .expect("desc next");
        }
        offer_head(mem, first);
        first
    }

    /// Puts `head` on the RX avail ring (whatever it is) and publishes it.
    fn offer_head(mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(RX_AVAIL + 2)).expect("avail idx");
        mem.write_obj(head, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(idx % 256)))
            .expect("avail entry");
        mem.write_obj(idx.wrapping_add(1), GuestAddress(RX_AVAIL + 2))
            .expect("avail idx");
    }

    /// The RX used ring: (head, length) of every entry.
    fn rx_used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(RX_USED + 2)).expect("used idx");
        (0..idx)
            .map(|i| {
                let e = RX_USED + 4 + 8 * u64::from(i);
                let id: u32 = mem.read_obj(GuestAddress(e)).expect("used id");
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("used len");
                (id, len)
            })
            .collect()
    }

    /// Runs `handle_event(event)` on a thread; fails the test unless it returns within 5 s (a
    /// thread that spins is left behind: the test process ends with the test run).
    fn handle_within_5s(
        backend: VsockBackend,
        vrings: Vec<VringRwLock>,
        event: u16,
    ) -> (VsockBackend, Vec<VringRwLock>) {
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut backend = backend;
            backend
                .handle_event(event, EventSet::IN, &vrings, 0)
                .expect("handled");
            let _ = done.send((backend, vrings));
        });
        wait.recv_timeout(Duration::from_secs(5))
            .expect("handle_event did not return within 5 s: the VM's thread spins")
    }

    #[test]
    fn an_rx_chain_with_no_room_for_data_is_returned_not_retried_forever() {
        let dir = std::env::temp_dir().join(format!(
            "vmlink-vhost-backend-zero-room-{}",
            std::process::id()
        ));
        let (device, counters, l) = device_with_a_connection(&dir);
        let (mut host, _) = l.accept().expect("accept");

        let mut backend = VsockBackend::new(device).expect("backend");
        let atomic = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory"),
        );
        backend.update_memory(atomic.clone()).expect("memory");
        backend.set_event_idx(true);
        let vrings: Vec<VringRwLock> = (0..NUM_QUEUES as u64)
            .map(|i| {
                let v = VringRwLock::new(atomic.clone(), 256).expect("vring");
                let base = i * 0x1_0000;
                v.set_queue_info(base, base + 0x1000, base + 0x2000)
                    .expect("queue addresses");
                v.set_queue_event_idx(true);
                v.set_queue_ready(true);
                v
            })
            .collect();
        let mem = atomic.memory();

        // The host sends: the connection has data for the guest (has_rx stays true).
        std::io::Write::write_all(&mut host, b"hello").expect("host write");
        backend.device.handle_host_events();
        assert!(backend.device().has_rx());

        // Two chains whose data part is 0 bytes: the RESPONSE (header only) fits in the first;
        // the second can hold no byte of "hello".
        let a = offer_rx(
            &mem,
            0,
            &[(RX_BUFS, 44, F_WRITE), (RX_BUFS + 64, 0, F_WRITE)],
        );
        let b = offer_rx(
            &mem,
            2,
            &[
                (RX_BUFS + 0x1000, 44, F_WRITE),
                (RX_BUFS + 0x1040, 0, F_WRITE),
            ],
        );
        let (backend, vrings) = handle_within_5s(backend, vrings, RX_QUEUE);
        let used = rx_used(&mem);
        assert_eq!(
            used,
            vec![(u32::from(a), 44), (u32::from(b), 0)],
            "the RESPONSE in the first chain, the second returned unused"
        );
        let op: u16 = mem.read_obj(GuestAddress(RX_BUFS + 30)).expect("op");
        assert_eq!(op, crate::device::OP_RESPONSE);
        assert_eq!(counters.get(Counter::malformed_rx_descriptors), 1);
        assert!(backend.device().has_rx(), "the data still waits");

        // The guest has no buffer left: it is asked to kick for the next one (avail_event is
        // where it will write next).
        let avail_event: u16 = mem
            .read_obj(GuestAddress(RX_USED + 4 + 8 * 256))
            .expect("avail_event");
        assert_eq!(avail_event, 2);

        // A well-formed 4 KiB buffer after the bad one gets the data.
        let c = offer_rx(
            &mem,
            4,
            &[
                (RX_BUFS + 0x2000, 44, F_WRITE),
                (RX_BUFS + 0x2040, 4096, F_WRITE),
            ],
        );
        let (backend, _vrings) = handle_within_5s(backend, vrings, RX_QUEUE);
        assert_eq!(rx_used(&mem)[2], (u32::from(c), 44 + 5));
        let mut data = [0u8; 5];
        mem.read_slice(&mut data, GuestAddress(RX_BUFS + 0x2040))
            .expect("data");
        assert_eq!(&data, b"hello");
        assert_eq!(counters.get(Counter::malformed_rx_descriptors), 1);
        assert!(!backend.device().has_rx());
        drop(backend);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A log sink for [`logged`].
    #[derive(Clone, Default)]
    struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

    impl io::Write for Log {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` and returns what this thread logged meanwhile (tracing, info and above), one
    /// string a line.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&log.0.lock().expect("log")).into_owned();
        text.lines().map(str::to_owned).collect()
    }

    /// A queue of 256 entries with its rings at `RX_DESC`, `RX_AVAIL` and `used`, ready.
    fn bare_queue(used: u64) -> Queue {
        let mut queue = Queue::new(256).expect("queue");
        queue.set_desc_table_address(Some(RX_DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(RX_AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    /// A device (guest CID 3, in `dir`) with one guest connection: a RESPONSE waits for RX.
    fn device_with_a_connection(dir: &std::path::Path) -> (Device, Arc<Counters>, UnixListener) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("dir");
        let mut cfg = DeviceConfig::new(3, dir.join("v"));
        cfg.tick = Duration::from_secs(3600);
        let counters = Arc::new(Counters::default());
        let mut device = Device::new(cfg, counters.clone()).expect("device");
        let l = UnixListener::bind(dir.join("v_1234")).expect("bind");
        device.on_guest_packet(&guest_request(), &[]);
        (device, counters, l)
    }

    fn guest_request() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1234,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 1 << 18,
            ..Header::default()
        }
    }

    #[test]
    fn avail_entries_with_a_head_out_of_range_are_counted_and_not_returned_nor_logged_each() {
        let dir = std::env::temp_dir().join(format!(
            "vmlink-vhost-backend-bad-head-{}",
            std::process::id()
        ));
        let (mut device, counters, _l) = device_with_a_connection(&dir);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let mut buf = Vec::new();

        // RX: 16 bogus heads, then a valid chain, which gets the RESPONSE.
        let mut rx = bare_queue(RX_USED);
        for _ in 0..16 {
            offer_head(&mem, 0xFFFF);
        }
        let good = offer_rx(
            &mem,
            0,
            &[(RX_BUFS, 44, F_WRITE), (RX_BUFS + 64, 4096, F_WRITE)],
        );
        let lines = logged(|| assert!(fill_rx(&mut device, &mut rx, &mem, &mut buf, None)));
        assert_eq!(counters.get(Counter::malformed_rx_descriptors), 16);
        assert_eq!(
            rx_used(&mem),
            vec![(u32::from(good), 44)],
            "only the valid chain is returned: the RESPONSE in it"
        );
        // 1st, 2nd, 4th, 8th, 16th: rate-limited, and no add_used failure for any of them.
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines.iter().all(|l| !l.contains("descriptor to the guest")),
            "{lines:#?}"
        );

        // TX (the same ring addresses, afresh): 16 bogus heads, then an RST from the guest.
        for a in [RX_AVAIL, RX_USED] {
            mem.write_obj(0u16, GuestAddress(a + 2)).expect("idx");
        }
        let mut tx = bare_queue(RX_USED);
        for _ in 0..16 {
            offer_head(&mem, 0xFFFF);
        }
        let rst = Header {
            op: crate::device::OP_RST,
            buf_alloc: 0,
            ..guest_request()
        };
        mem.write_slice(&rst.to_bytes(), GuestAddress(RX_BUFS))
            .expect("rst");
        let good = offer_rx(&mem, 0, &[(RX_BUFS, 44, 0)]);
        assert_eq!(device.connection_count(), 1);
        let lines = logged(|| {
            assert_eq!(drain_tx(&mut device, &mut tx, &mem, &mut buf, None), 1);
        });
        assert_eq!(counters.get(Counter::malformed_descriptors), 16);
        assert_eq!(rx_used(&mem), vec![(u32::from(good), 0)]);
        assert_eq!(device.connection_count(), 0, "the RST was handled");
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines.iter().all(|l| !l.contains("descriptor to the guest")),
            "{lines:#?}"
        );

        // A used ring outside guest memory: every add_used fails, the warnings are rate-limited.
        let mut tx = bare_queue(0x20_0000);
        for a in [RX_AVAIL, RX_USED] {
            mem.write_obj(0u16, GuestAddress(a + 2)).expect("idx");
        }
        for i in 0..16 {
            offer_rx(&mem, i, &[(RX_BUFS, 44, 0)]);
        }
        let lines = logged(|| {
            assert_eq!(drain_tx(&mut device, &mut tx, &mem, &mut buf, None), 16);
        });
        let failures = lines
            .iter()
            .filter(|l| l.contains("cannot return a TX descriptor"))
            .count();
        assert!((1..=5).contains(&failures), "{lines:#?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
