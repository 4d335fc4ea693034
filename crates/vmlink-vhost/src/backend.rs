//! The thin vhost-user adapter: virtqueues in, [`Device`] calls out.
//!
//! `vhost-user-backend` runs the vhost-user protocol and the epoll loop; `virtio-queue` walks the
//! rings; `virtio-vsock` parses packets out of descriptor chains. This module only moves headers
//! and payloads between them and the device model. [`drain_tx`] and [`fill_rx`] work on a bare
//! [`Queue`], so that tests drive them through `virtio-queue`'s `MockSplitQueue`.

use std::io;
use std::sync::atomic::Ordering;
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
use crate::counters::{Counter, Counters};
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
        if let Err(e) = queue.add_used(mem, head, 0) {
            warn!("cannot return a TX descriptor to the guest: {e}");
        }
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
    let mut used = false;
    if buf.len() < MAX_PKT_DATA {
        buf.resize(MAX_PKT_DATA, 0);
    }
    while device.has_rx() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA as u32) {
            Ok(p) => p,
            Err(e) => {
                device.count_malformed_rx(&e);
                if let Err(e) = queue.add_used(mem, head, 0) {
                    warn!("cannot return an RX descriptor to the guest: {e}");
                }
                used = true;
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
            queue.go_to_previous_position();
            break;
        };
        set_header(&mut pkt, &hdr);
        let len = hdr.len as usize;
        if let Some(c) = capture {
            c.packet(&hdr, &buf[..len]);
        }
        if let Err(e) = queue.add_used(mem, head, (PKT_HEADER_SIZE + len) as u32) {
            warn!("cannot return an RX descriptor to the guest: {e}");
        }
        used = true;
    }
    used
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
            rx_used |= fill_rx(
                &mut self.device,
                rx.get_mut().get_queue_mut(),
                &*mem,
                &mut self.rx_buf,
                self.capture.as_deref(),
            );
            // More buffers may have come while notifications were off: look again, but only
            // when there is something to put in them.
            if !self.event_idx
                || !rx.enable_notification().unwrap_or(false)
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
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut cfg = DeviceConfig::new(3, dir.join("v"));
        cfg.tick = Duration::from_secs(3600);
        let mut device = Device::new(cfg, Arc::new(Counters::default())).expect("device");
        let l = UnixListener::bind(dir.join("v_1234")).expect("bind");
        let req = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1234,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 1 << 18,
            ..Header::default()
        };
        device.on_guest_packet(&req, &[]);
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
}
