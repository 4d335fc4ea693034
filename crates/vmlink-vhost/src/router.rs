//! VM-to-VM routing between the VMs of one process.
//!
//! A packet from guest A to CID B (not the host) is forwarded as is, after A's source CID has
//! been checked, when B is served by this process and A and B share a group. Otherwise it is
//! dropped (a request is answered with RST). Credit between two guests is their own business:
//! both run the virtio-vsock protocol end to end, and this process only carries packets.
//!
//! Each VM has an [`Inbox`]: a bounded queue of packets from other VMs plus an eventfd that wakes
//! the VM's device thread. A full inbox (the receiving guest is not taking its RX queue) drops
//! the packet and resets the connection on both sides: the sender's guest gets an RST from its
//! own device, the receiver's an RST in its inbox, as if from the sender, in room kept for such
//! RSTs ([`INBOX_RESERVED_RSTS`]; when that is full too, only the sender's side is reset and the
//! receiver's half stays open until it sends, which the sender's guest answers with RST).
//!
//! The inbox is not divided among senders: it is first come, first served. A guest that sends
//! to another faster than that guest takes its RX queue (a hostile one ignores the receiver's
//! credit) can keep the receiver's inbox full, and then the packets of every other VM of the
//! group to that receiver are dropped too and their connections reset. The other VMs' own
//! traffic (to the host, to VMs whose inbox is not full) is not affected, and VMs that share no
//! group with the sender cannot be reached by it at all: groups are the isolation boundary.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::Header;

/// Most packets waiting in one VM's inbox.
pub const INBOX_MAX_PACKETS: usize = 4096;
/// Most payload bytes waiting in one VM's inbox (8 MiB).
pub const INBOX_MAX_BYTES: usize = 8 << 20;
/// Room kept in each inbox, beyond [`INBOX_MAX_PACKETS`], for the RSTs that reset the
/// receiver's half of a connection whose packet a full inbox dropped ([`Router::reset_receiver`]).
pub const INBOX_RESERVED_RSTS: usize = 1024;

/// A packet from another VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// Its header, as the sending guest wrote it (source CID checked).
    pub hdr: Header,
    /// Its payload.
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Queue {
    packets: VecDeque<Forwarded>,
    bytes: usize,
}

/// One VM's queue of packets from other VMs.
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<Queue>,
    event: EventFd,
}

impl Inbox {
    fn new() -> io::Result<Self> {
        Ok(Inbox {
            queue: Mutex::new(Queue::default()),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent: take it anyway.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd that is readable when packets arrived.
    pub fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Clears the wake-up (call before draining).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Whether packets are waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().packets.is_empty()
    }

    /// Takes the next packet, or its first `max` payload bytes when it is larger (the rest stays
    /// at the front, as a packet of its own with the same header).
    pub fn pop(&self, max: usize) -> Option<Forwarded> {
        let mut q = self.lock();
        let front = q.packets.front_mut()?;
        if front.data.len() <= max {
            let p = q.packets.pop_front()?;
            q.bytes -= p.data.len();
            return Some(p);
        }
        let head: Vec<u8> = front.data.drain(..max).collect();
        let mut hdr = front.hdr;
        hdr.len = max as u32;
        // Only the last piece of a seqpacket message carries its end-of-message flags.
        hdr.flags &= !(crate::device::SEQ_EOM | crate::device::SEQ_EOR);
        front.hdr.len = front.data.len() as u32;
        q.bytes -= max;
        Some(Forwarded { hdr, data: head })
    }

    /// Drops every waiting packet.
    pub fn clear(&self) {
        let mut q = self.lock();
        q.packets.clear();
        q.bytes = 0;
    }

    /// Queues `p` if there is room: [`INBOX_MAX_PACKETS`] and [`INBOX_MAX_BYTES`], plus
    /// `reserved` packets more.
    fn push(&self, p: Forwarded, reserved: usize) -> bool {
        {
            let mut q = self.lock();
            if q.packets.len() >= INBOX_MAX_PACKETS + reserved
                || q.bytes + p.data.len() > INBOX_MAX_BYTES
            {
                return false;
            }
            q.bytes += p.data.len();
            q.packets.push_back(p);
        }
        let _ = self.event.write(1);
        true
    }
}

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardError {
    /// No VM of this process has that CID, or it shares no group with the sender.
    Unreachable,
    /// The receiver's inbox is full.
    Full,
}

#[derive(Debug)]
struct Vm {
    groups: Vec<String>,
    inbox: Arc<Inbox>,
}

/// The VMs of this process, their groups and inboxes.
#[derive(Debug)]
pub struct Router {
    vms: HashMap<u64, Vm>,
}

impl Router {
    /// A router for VMs given as `(cid, groups)`.
    pub fn new<'a>(vms: impl IntoIterator<Item = (u64, &'a [String])>) -> io::Result<Self> {
        let mut map = HashMap::new();
        for (cid, groups) in vms {
            map.insert(
                cid,
                Vm {
                    groups: groups.to_vec(),
                    inbox: Arc::new(Inbox::new()?),
                },
            );
        }
        Ok(Router { vms: map })
    }

    /// `cid`'s inbox.
    pub fn inbox(&self, cid: u64) -> Option<&Arc<Inbox>> {
        self.vms.get(&cid).map(|v| &v.inbox)
    }

    /// Whether `from` may send to `to`: both are here and share a group.
    pub fn can_reach(&self, from: u64, to: u64) -> bool {
        match (self.vms.get(&from), self.vms.get(&to)) {
            (Some(a), Some(b)) if from != to => a.groups.iter().any(|g| b.groups.contains(g)),
            _ => false,
        }
    }

    /// Forwards a packet from guest `hdr.src_cid` to guest `hdr.dst_cid`.
    pub fn forward(&self, hdr: &Header, data: &[u8]) -> Result<(), ForwardError> {
        if !self.can_reach(hdr.src_cid, hdr.dst_cid) {
            return Err(ForwardError::Unreachable);
        }
        let to = self
            .vms
            .get(&hdr.dst_cid)
            .ok_or(ForwardError::Unreachable)?;
        if to.inbox.push(
            Forwarded {
                hdr: *hdr,
                data: data.to_vec(),
            },
            0,
        ) {
            Ok(())
        } else {
            Err(ForwardError::Full)
        }
    }

    /// After [`Router::forward`] dropped `hdr` for a full inbox: queues, in the room kept for it
    /// ([`INBOX_RESERVED_RSTS`]), an RST to the receiver as from the sender, so that the
    /// receiving guest frees its half of the connection. Nothing for a dropped REQUEST (the
    /// receiver never heard of that connection). Returns whether an RST was queued.
    pub fn reset_receiver(&self, hdr: &Header) -> bool {
        if hdr.op == crate::device::OP_REQUEST || !self.can_reach(hdr.src_cid, hdr.dst_cid) {
            return false;
        }
        let Some(to) = self.vms.get(&hdr.dst_cid) else {
            return false;
        };
        let rst = Header {
            len: 0,
            op: crate::device::OP_RST,
            flags: 0,
            ..*hdr
        };
        to.inbox.push(
            Forwarded {
                hdr: rst,
                data: Vec::new(),
            },
            INBOX_RESERVED_RSTS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_vms_sharing_a_group_reach_each_other() {
        let (a, b, c) = (groups(&["x"]), groups(&["x", "y"]), groups(&["z"]));
        let r = Router::new([(3, &a[..]), (4, &b[..]), (5, &c[..])]).expect("router");
        assert!(r.can_reach(3, 4) && r.can_reach(4, 3));
        assert!(!r.can_reach(3, 5) && !r.can_reach(5, 4));
        assert!(!r.can_reach(3, 3), "no loop to itself");
        assert!(!r.can_reach(3, 9), "unknown CID");
        let none = Router::new([(3, &[][..]), (4, &[][..])]).expect("router");
        assert!(!none.can_reach(3, 4), "no group, no route");
    }

    #[test]
    fn big_packets_are_split_and_the_inbox_is_bounded() {
        let a = groups(&["x"]);
        let r = Router::new([(3, &a[..]), (4, &a[..])]).expect("router");
        let hdr = Header {
            src_cid: 3,
            dst_cid: 4,
            len: 10,
            flags: crate::device::SEQ_EOM,
            ..Header::default()
        };
        r.forward(&hdr, b"0123456789").expect("forward");
        let inbox = r.inbox(4).expect("inbox");
        let p1 = inbox.pop(4).expect("piece");
        assert_eq!(
            (p1.hdr.len, p1.hdr.flags, &p1.data[..]),
            (4, 0, &b"0123"[..])
        );
        let p2 = inbox.pop(100).expect("rest");
        assert_eq!(
            (p2.hdr.len, p2.hdr.flags, &p2.data[..]),
            (6, crate::device::SEQ_EOM, &b"456789"[..])
        );
        assert!(inbox.is_empty());
        let big = vec![0u8; 64 * 1024];
        let hdr = Header {
            len: big.len() as u32,
            ..hdr
        };
        let mut sent = 0;
        while r.forward(&hdr, &big).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, INBOX_MAX_BYTES / big.len());
        assert_eq!(r.forward(&hdr, &big), Err(ForwardError::Full));
    }

    #[test]
    fn a_full_inbox_keeps_room_for_the_receivers_rsts() {
        let a = groups(&["x"]);
        let r = Router::new([(3, &a[..]), (4, &a[..])]).expect("router");
        let hdr = Header {
            src_cid: 3,
            dst_cid: 4,
            src_port: 7,
            dst_port: 8,
            type_: crate::device::TYPE_STREAM,
            op: crate::device::OP_RW,
            len: 1,
            ..Header::default()
        };
        while r.forward(&hdr, b"x").is_ok() {}
        let inbox = r.inbox(4).expect("inbox");
        assert_eq!(inbox.lock().packets.len(), INBOX_MAX_PACKETS);
        let mut rsts = 0;
        while r.reset_receiver(&hdr) {
            rsts += 1;
        }
        assert_eq!(rsts, INBOX_RESERVED_RSTS, "bounded too");
        let last = inbox.lock().packets.back().cloned().expect("rst");
        assert_eq!(
            (
                last.hdr.op,
                last.hdr.src_cid,
                last.hdr.dst_cid,
                last.hdr.len
            ),
            (crate::device::OP_RST, 3, 4, 0)
        );
        assert_eq!((last.hdr.src_port, last.hdr.dst_port), (7, 8));
        let req = Header {
            op: crate::device::OP_REQUEST,
            ..hdr
        };
        inbox.clear();
        assert!(
            !r.reset_receiver(&req),
            "no RST for a connection never opened"
        );
    }
}
