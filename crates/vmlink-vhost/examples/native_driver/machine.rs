//! The "VMM" half: guest memory in a memfd, the vhost-user handshake with the backend, and the
//! driver side of the split virtqueues.
//!
//! The handshake follows what QEMU does for `vhost-user-vsock-pci` (hw/virtio/vhost-user.c,
//! vhost-vsock-common.c): SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, then on driver
//! start SET_FEATURES, SET_MEM_TABLE and, per vring, SET_VRING_NUM, SET_VRING_BASE,
//! SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, and SET_VRING_ENABLE. Like QEMU, only the RX
//! (0) and TX (1) vrings go to the backend: QEMU keeps the event queue (2) for itself
//! (`vhost_vqs[2]` in vhost-vsock-common), and this driver never gets transport events.
//! The queue size is QEMU's `VHOST_VSOCK_QUEUE_SIZE`, 128.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, ensure, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// QEMU's `VHOST_VSOCK_QUEUE_SIZE` (include/hw/virtio/vhost-vsock-common.h).
pub const QUEUE_SIZE: u16 = 128;
/// The RX virtqueue's index.
pub const RX_QUEUE: usize = 0;
/// The TX virtqueue's index.
pub const TX_QUEUE: usize = 1;
/// Queues the device has (rx, tx, event); the backend gets the first two, as from QEMU.
const DEVICE_QUEUES: u64 = 3;

const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Guest memory size: the rings, 64 RX buffers of 4 KiB and 64 TX buffers of 64 KiB fit.
pub const MEM_SIZE: usize = 16 << 20;
/// Where each ring lives (descriptor table, avail ring 2 KiB on, used ring 4 KiB on).
const RING_AT: [u64; 2] = [0x0, 0x2000];
/// Where the RX buffers start, and the distance between two.
pub const RX_BUFS_AT: u64 = 0x1_0000;
pub const RX_SLOT: u64 = 0x1100;
/// Where the TX buffers start, and the distance between two.
pub const TX_BUFS_AT: u64 = 0x10_0000;
pub const TX_SLOT: u64 = 0x1_1000;
/// Payload offset within an RX or TX slot (the 44-byte header comes first).
pub const DATA_OFFSET: u64 = 64;

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// The driver side of one split virtqueue in guest memory.
///
/// Indices are kept as Linux's `vring_virtqueue` does: `avail_idx` is the shadow of the
/// avail ring's idx, `kicked_at` its value at the last kick decision (for `vring_need_event`),
/// `used_seen` the driver's `last_used_idx`. With `EVENT_IDX`, `used_event` (after the avail
/// ring) tells the device when to interrupt, and the device's `avail_event` (after the used
/// ring) when to kick.
#[derive(Debug)]
pub struct Ring {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    kicked_at: u16,
    used_seen: u16,
    event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    /// Kicks written to the eventfd, and kicks the device's `avail_event` made unnecessary.
    pub kicks: u64,
    pub kicks_saved: u64,
}

impl Ring {
    fn new(at: u64, size: u16, event_idx: bool) -> Result<Ring> {
        Ok(Ring {
            size,
            desc: at,
            avail: at + 0x800,
            used: at + 0x1000,
            avail_idx: 0,
            kicked_at: 0,
            used_seen: 0,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK).context("kick eventfd")?,
            call: EventFd::new(EFD_NONBLOCK).context("call eventfd")?,
            kicks: 0,
            kicks_saved: 0,
        })
    }

    fn config(&self, mem: &GuestMemoryMmap) -> Result<VringConfigData> {
        // vhost-user rings are given as addresses in the frontend's own address space.
        let va = |gpa: u64| -> Result<u64> {
            Ok(mem
                .get_host_address(GuestAddress(gpa))
                .context("ring address outside guest memory")? as u64)
        };
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: va(self.desc)?,
            used_ring_addr: va(self.used)?,
            avail_ring_addr: va(self.avail)?,
            log_addr: None,
        })
    }

    /// Writes chain `descs` at descriptor `head` and the following ones.
    pub fn write_chain(&self, mem: &GuestMemoryMmap, head: u16, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let mut flags = if d.device_writes {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
                idx + 1
            } else {
                0
            };
            let at = GuestAddress(self.desc + 16 * u64::from(idx));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at)
                .expect("descriptor table in guest memory");
        }
    }

    /// Makes chain `head` available (Linux's `virtqueue_add`: the entry, a write barrier, the
    /// index). The device may take it at once; it is told by [`Ring::kick`].
    pub fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.store(head.to_le(), slot, Ordering::Relaxed)
            .expect("avail ring in guest memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .expect("avail idx in guest memory");
    }

    /// Linux's `virtqueue_kick`: notify the device of what was offered since the last kick,
    /// unless it said (`avail_event`, or `VRING_USED_F_NO_NOTIFY` without EVENT_IDX) that it
    /// does not need to be.
    pub fn kick(&mut self, mem: &GuestMemoryMmap) -> Result<()> {
        let (old, new) = (self.kicked_at, self.avail_idx);
        if old == new {
            return Ok(());
        }
        self.kicked_at = new;
        // The avail idx store must be visible before the device's flags/event are read.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let at = GuestAddress(self.used + 4 + 8 * u64::from(self.size));
            let avail_event = u16::from_le(mem.load(at, Ordering::Acquire).expect("avail_event"));
            need_event(avail_event, new, old)
        } else {
            let flags: u16 = u16::from_le(
                mem.load(GuestAddress(self.used), Ordering::Acquire)
                    .expect("used flags"),
            );
            flags & VRING_USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.kicks += 1;
            self.kick.write(1).context("write the kick eventfd")?;
        } else {
            self.kicks_saved += 1;
        }
        Ok(())
    }

    /// The next used element: (head, length written by the device).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx = u16::from_le(
            mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                .expect("used idx"),
        );
        if idx == self.used_seen {
            return None;
        }
        let e = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % self.size));
        let id = u32::from_le(mem.read_obj(e).expect("used id"));
        let len = u32::from_le(mem.read_obj(e.unchecked_add(4)).expect("used len"));
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Linux's `virtqueue_enable_cb`: ask for an interrupt at the next used element; returns
    /// false when one is already there (the caller processes it instead of waiting).
    pub fn enable_interrupts(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.event_idx {
            let at = GuestAddress(self.avail + 4 + 2 * u64::from(self.size));
            mem.store(self.used_seen.to_le(), at, Ordering::Relaxed)
                .expect("used_event");
        } else {
            mem.store(0u16, GuestAddress(self.avail), Ordering::Relaxed)
                .expect("avail flags");
        }
        fence(Ordering::SeqCst);
        let idx = u16::from_le(
            mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                .expect("used idx"),
        );
        idx == self.used_seen
    }

    /// Linux's `virtqueue_disable_cb` without EVENT_IDX (with it, a stale `used_event` already
    /// keeps the device quiet until [`Ring::enable_interrupts`] moves it).
    pub fn disable_interrupts(&mut self, mem: &GuestMemoryMmap) {
        if !self.event_idx {
            mem.store(
                VRING_AVAIL_F_NO_INTERRUPT.to_le(),
                GuestAddress(self.avail),
                Ordering::Relaxed,
            )
            .expect("avail flags");
        }
    }
}

/// `vring_need_event`: whether `event` lies in `[old, new)`, modulo 2^16.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest memory, the vhost-user connection and the two vrings given to the backend.
pub struct Machine {
    pub mem: GuestMemoryMmap,
    pub rx: Ring,
    pub tx: Ring,
    pub event_idx: bool,
    /// The guest CID the backend reports in its config space.
    pub guest_cid: u64,
    /// Kept for the session's lifetime: the backend stops when it closes.
    _frontend: Frontend,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("event_idx", &self.event_idx)
            .field("guest_cid", &self.guest_cid)
            .finish_non_exhaustive()
    }
}

/// Guest memory in one memfd, so that the backend can map it (SET_MEM_TABLE passes the fd).
fn guest_memory() -> Result<GuestMemoryMmap> {
    let fd = nix::sys::memfd::memfd_create(
        c"vsock-driver-guest-memory",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("memfd_create for guest memory")?;
    let file = File::from(fd);
    file.set_len(MEM_SIZE as u64)
        .context("size the guest memory memfd")?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .context("map guest memory")
}

impl Machine {
    /// Connects to the backend's vhost-user socket and brings the device up as QEMU does when
    /// the guest driver sets DRIVER_OK. `use_event_idx`: negotiate VIRTIO_RING_F_EVENT_IDX when
    /// the backend offers it (Linux does).
    pub fn connect(socket: &Path, use_event_idx: bool) -> Result<Machine> {
        let mem = guest_memory()?;
        let mut fe = Frontend::connect(socket, DEVICE_QUEUES)
            .with_context(|| format!("connect to vhost-user socket {}", socket.display()))?;
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        ensure!(
            offered & (1 << VIRTIO_F_VERSION_1) != 0,
            "backend does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
        );
        ensure!(
            offered & protocol_bit != 0,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {offered:#x})"
        );
        let proto = fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        // What QEMU's vhost-user-vsock would use of what it is offered: MQ (queue count),
        // CONFIG (the guest CID), REPLY_ACK (acknowledged requests).
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        let proto = proto & want;
        fe.set_protocol_features(proto)
            .context("SET_PROTOCOL_FEATURES")?;
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().context("GET_QUEUE_NUM")?;
            ensure!(
                n >= 2,
                "backend has {n} queues, a vsock device needs rx and tx"
            );
        }

        let event_idx = use_event_idx && offered & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut acked = (1 << VIRTIO_F_VERSION_1) | protocol_bit;
        if event_idx {
            acked |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        fe.set_features(acked).context("SET_FEATURES")?;

        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).context("memory region"))
            .collect::<Result<Vec<_>>>()?;
        ensure!(regions.len() == 1 && regions[0].memory_size == MEM_SIZE as u64);
        fe.set_mem_table(&regions).context("SET_MEM_TABLE")?;

        let rx = Ring::new(RING_AT[RX_QUEUE], QUEUE_SIZE, event_idx)?;
        let tx = Ring::new(RING_AT[TX_QUEUE], QUEUE_SIZE, event_idx)?;
        for (i, ring) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            fe.set_vring_num(i, ring.size)
                .with_context(|| format!("SET_VRING_NUM {i}"))?;
            fe.set_vring_base(i, 0)
                .with_context(|| format!("SET_VRING_BASE {i}"))?;
            fe.set_vring_addr(i, &ring.config(&mem)?)
                .with_context(|| format!("SET_VRING_ADDR {i}"))?;
            fe.set_vring_kick(i, &ring.kick)
                .with_context(|| format!("SET_VRING_KICK {i}"))?;
            fe.set_vring_call(i, &ring.call)
                .with_context(|| format!("SET_VRING_CALL {i}"))?;
        }
        for i in [RX_QUEUE, TX_QUEUE] {
            fe.set_vring_enable(i, true)
                .with_context(|| format!("SET_VRING_ENABLE {i}"))?;
        }
        // A request with a reply: the backend handles requests in order, so once this answer is
        // in, every ring is set up and enabled before the first kick.
        let guest_cid = if proto.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = fe
                .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
                .context("GET_CONFIG (guest CID)")?;
            let b: [u8; 8] = payload
                .get(..8)
                .and_then(|s| s.try_into().ok())
                .context("GET_CONFIG answered fewer than 8 bytes")?;
            u64::from_le_bytes(b)
        } else {
            fe.get_features().context("GET_FEATURES (barrier)")?;
            0
        };
        Ok(Machine {
            mem,
            rx,
            tx,
            event_idx,
            guest_cid,
            _frontend: fe,
        })
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns which were readable.
pub fn wait_readable(fds: &[&EventFd], timeout_ms: i32) -> Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("poll on the call eventfds: {e}");
        }
        return Ok(pfds.iter().map(|p| p.revents & libc::POLLIN != 0).collect());
    }
}
