//! VM-to-VM routing between the VMs of one process.
//!
//! A packet from guest A to CID B (not the host) is forwarded as is, after A's source CID has
//! been checked, when B is served by this process and A and B share a group. Otherwise it is
//! dropped (a request is answered with RST). Credit between two guests is their own business:
//! both run the virtio-vsock protocol end to end, and this process only carries packets.
//!
//! Each VM has an [`Inbox`]: the packets from other VMs waiting for its RX queue, plus an
//! eventfd that wakes the VM's device thread. The inbox is divided among senders: one FIFO per
//! sending VM (by source CID, which the sender's device has checked), so the packets of each
//! connection keep their order, and [`Inbox::pop`] serves the senders with packets in turn,
//! one packet each (or one piece of it: a packet larger than the guest's RX buffer is cut, and
//! the rest waits at its sender's front for that sender's next turn), so that a guest's RX
//! queue is shared out in RX buffers between the VMs that send to it.
//!
//! Each sender has its own bound ([`INBOX_SENDER_MAX_PACKETS`] and [`INBOX_SENDER_MAX_BYTES`]).
//! A packet past it (the receiving guest does not take its RX queue fast enough for that
//! sender) is dropped and its connection reset on both sides: the sender's guest gets an RST
//! from its own device, the receiver's an RST in its inbox, as if from the sender, in room kept
//! for such RSTs in that sender's FIFO ([`INBOX_RESERVED_RSTS`]; when that is full too, only the
//! sender's side is reset and the receiver's half stays open until it sends, which the sender's
//! guest answers with RST). So a guest that floods another (a hostile one ignores the
//! receiver's credit) fills its own FIFO and loses its own packets and connections; the other
//! VMs of the group keep their room in the receiver's inbox and their turns at its RX queue,
//! and the receiver takes the flood only at the pace of one packet in every round.
//!
//! The whole inbox is bounded by the per-sender bounds times the number of senders, which is
//! fixed when the [`Router`] is made: the VMs that share a group with the receiver
//! ([`Inbox::max_senders`]), 8 MiB each. The bound is per sender, not a share of a fixed total,
//! so that what a sender may queue never depends on how many VMs the group has or on what they
//! do: a lone sender has as much room as in a group of two, and no other sender can take it.
//! The price is memory that grows with the group: a VM with `n` possible senders may hold
//! `n` × 8 MiB. Groups are also the isolation boundary: a VM that shares no group with a
//! guest cannot be reached by it at all.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::Header;

/// Most packets one sending VM may have waiting in another VM's inbox.
pub const INBOX_SENDER_MAX_PACKETS: usize = 4096;
/// Most payload bytes one sending VM may have waiting in another VM's inbox (8 MiB).
pub const INBOX_SENDER_MAX_BYTES: usize = 8 << 20;
/// Room kept for each sender in each inbox, beyond [`INBOX_SENDER_MAX_PACKETS`], for the RSTs
/// that reset the receiver's half of a connection of that sender whose packet its full FIFO
/// dropped ([`Router::reset_receiver`]).
pub const INBOX_RESERVED_RSTS: usize = 1024;

/// A packet from another VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// Its header, as the sending guest wrote it (source CID checked).
    pub hdr: Header,
    /// Its payload.
    pub data: Vec<u8>,
}

/// The packets of one sender, in the order it sent them.
#[derive(Debug, Default)]
struct SenderQueue {
    packets: VecDeque<Forwarded>,
    /// Payload bytes waiting (those of the front packet already taken not counted).
    bytes: usize,
    /// Payload bytes of the front packet already taken in pieces: they stay in its buffer,
    /// rather than moving the rest down at each piece, until the last piece goes.
    taken: usize,
}

/// The packets waiting in an inbox.
#[derive(Debug, Default)]
struct Queues {
    /// The senders that have sent packets since the last [`Inbox::clear`], by source CID, at
    /// most [`Inbox::max_senders`]. An emptied queue is kept, with its memory, for the sender's
    /// next packets (freeing and growing it again at each burst costs more than the queue).
    senders: HashMap<u64, SenderQueue>,
    /// The senders that have packets waiting, each once, in the order [`Inbox::pop`] serves
    /// them (the front next).
    turns: VecDeque<u64>,
}

/// One VM's queue of packets from other VMs.
#[derive(Debug)]
pub struct Inbox {
    queues: Mutex<Queues>,
    max_senders: usize,
    event: EventFd,
}

impl Inbox {
    fn new(max_senders: usize) -> io::Result<Self> {
        Ok(Inbox {
            queues: Mutex::new(Queues::default()),
            max_senders,
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A panic while holding this lock cannot leave the queues inconsistent: take it anyway.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd that is readable when packets arrived.
    pub fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Clears the wake-up (call before draining).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Most senders this inbox takes packets from: the VMs that share a group with its VM.
    /// The inbox holds at most this many times [`INBOX_SENDER_MAX_BYTES`] and
    /// [`INBOX_SENDER_MAX_PACKETS`] (plus [`INBOX_RESERVED_RSTS`]).
    pub fn max_senders(&self) -> usize {
        self.max_senders
    }

    /// Whether packets are waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().turns.is_empty()
    }

    /// Takes the next packet of the sender whose turn it is, or its first `max` payload bytes
    /// when it is larger (the rest stays at that sender's front, as a packet of its own with the
    /// same header). Either way, the next call serves the next sender that has packets waiting.
    pub fn pop(&self, max: usize) -> Option<Forwarded> {
        let mut guard = self.lock();
        let q = &mut *guard;
        loop {
            let cid = q.turns.pop_front()?;
            let Some(s) = q.senders.get_mut(&cid) else {
                continue;
            };
            let Some(front) = s.packets.front_mut() else {
                continue;
            };
            let p = if front.data.len() - s.taken <= max {
                let mut p = s.packets.pop_front()?;
                if s.taken > 0 {
                    p.data.drain(..s.taken);
                    p.hdr.len = p.data.len() as u32;
                    s.taken = 0;
                }
                s.bytes -= p.data.len();
                p
            } else {
                let data = front.data[s.taken..s.taken + max].to_vec();
                s.taken += max;
                let mut hdr = front.hdr;
                hdr.len = max as u32;
                // Only the last piece of a seqpacket message carries its end-of-message flags.
                hdr.flags &= !(crate::device::SEQ_EOM | crate::device::SEQ_EOR);
                s.bytes -= max;
                Forwarded { hdr, data }
            };
            if !s.packets.is_empty() {
                q.turns.push_back(cid);
            }
            return Some(p);
        }
    }

    /// Drops every waiting packet.
    pub fn clear(&self) {
        let mut q = self.lock();
        q.senders.clear();
        q.turns.clear();
    }

    /// Queues `p` at the back of its sender's FIFO if that sender has room:
    /// [`INBOX_SENDER_MAX_PACKETS`] and [`INBOX_SENDER_MAX_BYTES`], plus `reserved` packets more.
    /// A sender past [`Inbox::max_senders`] others gets none (the [`Router`] lets none through).
    fn push(&self, p: Forwarded, reserved: usize) -> bool {
        let cid = p.hdr.src_cid;
        {
            let mut guard = self.lock();
            let q = &mut *guard;
            let known = q.senders.len();
            let s = match q.senders.entry(cid) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) if known < self.max_senders => e.insert(SenderQueue::default()),
                Entry::Vacant(_) => return false,
            };
            if s.packets.len() >= INBOX_SENDER_MAX_PACKETS + reserved
                || s.bytes + p.data.len() > INBOX_SENDER_MAX_BYTES
            {
                return false;
            }
            if s.packets.is_empty() {
                q.turns.push_back(cid);
            }
            s.bytes += p.data.len();
            s.packets.push_back(p);
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
    /// The sender's room in the receiver's inbox is full.
    Full,
}

#[derive(Debug)]
struct Vm {
    groups: Vec<String>,
    inbox: Arc<Inbox>,
}

fn share_a_group(a: &[String], b: &[String]) -> bool {
    a.iter().any(|g| b.contains(g))
}

/// The VMs of this process, their groups and inboxes.
#[derive(Debug)]
pub struct Router {
    vms: HashMap<u64, Vm>,
}

impl Router {
    /// A router for VMs given as `(cid, groups)`.
    pub fn new<'a>(vms: impl IntoIterator<Item = (u64, &'a [String])>) -> io::Result<Self> {
        let groups: HashMap<u64, Vec<String>> = vms
            .into_iter()
            .map(|(cid, groups)| (cid, groups.to_vec()))
            .collect();
        let mut map = HashMap::new();
        for (&cid, mine) in &groups {
            // The VMs that may send to this one: its inbox has room for each of them.
            let senders = groups
                .iter()
                .filter(|&(&other, theirs)| other != cid && share_a_group(mine, theirs))
                .count();
            map.insert(
                cid,
                Vm {
                    groups: mine.clone(),
                    inbox: Arc::new(Inbox::new(senders)?),
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
            (Some(a), Some(b)) if from != to => share_a_group(&a.groups, &b.groups),
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
    /// in the sender's FIFO ([`INBOX_RESERVED_RSTS`]), an RST to the receiver as from the sender, so that the
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
    use crate::device::{OP_RST, OP_RW, SEQ_EOM, TYPE_SEQPACKET, TYPE_STREAM};

    fn groups(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    /// A router whose VMs all share one group.
    fn one_group(cids: &[u64]) -> Router {
        let g = groups(&["x"]);
        Router::new(cids.iter().map(|&c| (c, &g[..]))).expect("router")
    }

    /// Data from `from`'s port `port` to VM 4.
    fn rw(from: u64, port: u32, len: usize) -> Header {
        Header {
            src_cid: from,
            dst_cid: 4,
            src_port: port,
            dst_port: 8,
            type_: TYPE_STREAM,
            op: OP_RW,
            len: len as u32,
            ..Header::default()
        }
    }

    /// Packets of `from`'s waiting in `inbox`.
    fn waiting(inbox: &Inbox, from: u64) -> usize {
        inbox
            .lock()
            .senders
            .get(&from)
            .map_or(0, |s| s.packets.len())
    }

    /// Takes every packet, `max` bytes at most each: (source CID, payload) in the order taken.
    fn drain(inbox: &Inbox, max: usize) -> Vec<(u64, Vec<u8>)> {
        std::iter::from_fn(|| inbox.pop(max))
            .map(|p| (p.hdr.src_cid, p.data))
            .collect()
    }

    #[test]
    fn only_vms_sharing_a_group_reach_each_other() {
        let (a, b, c, d) = (
            groups(&["x"]),
            groups(&["x", "y"]),
            groups(&["z"]),
            groups(&["y"]),
        );
        let r = Router::new([(3, &a[..]), (4, &b[..]), (5, &c[..]), (6, &d[..])]).expect("router");
        assert!(r.can_reach(3, 4) && r.can_reach(4, 3));
        assert!(!r.can_reach(3, 5) && !r.can_reach(5, 4));
        assert!(!r.can_reach(3, 3), "no loop to itself");
        assert!(!r.can_reach(3, 9), "unknown CID");
        let senders = |cid| r.inbox(cid).expect("inbox").max_senders();
        assert_eq!(
            [senders(3), senders(4), senders(5), senders(6)],
            [1, 2, 0, 1],
            "an inbox has room for the VMs that share a group with its VM"
        );
        let none = Router::new([(3, &[][..]), (4, &[][..])]).expect("router");
        assert!(!none.can_reach(3, 4), "no group, no route");
    }

    #[test]
    fn big_packets_are_split_and_the_inbox_is_bounded() {
        let r = one_group(&[3, 4]);
        let hdr = Header {
            flags: SEQ_EOM,
            type_: TYPE_SEQPACKET,
            ..rw(3, 7, 10)
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
            (6, SEQ_EOM, &b"456789"[..])
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
        assert_eq!(sent, INBOX_SENDER_MAX_BYTES / big.len());
        assert_eq!(r.forward(&hdr, &big), Err(ForwardError::Full));
    }

    #[test]
    fn a_flooding_sender_fills_only_its_own_room() {
        let r = one_group(&[3, 4, 5]);
        let inbox = r.inbox(4).expect("inbox");
        // VM 3 sends faster than VM 4 takes: its room fills, and its packets are dropped.
        let flood = rw(3, 7, 1);
        let mut sent = 0;
        while r.forward(&flood, b"x").is_ok() {
            sent += 1;
        }
        assert_eq!(sent, INBOX_SENDER_MAX_PACKETS);
        assert_eq!(r.forward(&flood, b"x"), Err(ForwardError::Full));
        assert!(r.reset_receiver(&flood), "the RST of 3's connection");
        // VM 5's packets to the same VM still go through, and are not behind the flood.
        r.forward(&rw(5, 9, 2), b"b1").expect("5 has its own room");
        r.forward(&rw(5, 9, 2), b"b2").expect("5 has its own room");
        assert_eq!(r.forward(&flood, b"x"), Err(ForwardError::Full), "3 still");
        let first: Vec<_> = std::iter::from_fn(|| inbox.pop(usize::MAX))
            .take(4)
            .map(|p| (p.hdr.src_cid, p.data))
            .collect();
        assert_eq!(
            first,
            [
                (3, b"x".to_vec()),
                (5, b"b1".to_vec()),
                (3, b"x".to_vec()),
                (5, b"b2".to_vec())
            ],
            "one packet of each sender in turn"
        );
        let rest = drain(inbox, usize::MAX);
        assert!(rest.iter().all(|(from, _)| *from == 3));
        assert_eq!(rest.len(), INBOX_SENDER_MAX_PACKETS + 1 - 2, "and the RST");
        // With VM 4 gone quiet again, each sender can fill its own room: the whole inbox then
        // holds its bound, max_senders times each sender's.
        let mut sent = [0; 2];
        for (i, from) in [3, 5].into_iter().enumerate() {
            while r.forward(&rw(from, 7, 1), b"x").is_ok() {
                sent[i] += 1;
            }
        }
        assert_eq!(sent, [INBOX_SENDER_MAX_PACKETS; 2]);
        assert_eq!(inbox.max_senders(), 2);
        assert_eq!(
            drain(inbox, usize::MAX).len(),
            inbox.max_senders() * INBOX_SENDER_MAX_PACKETS
        );
    }

    #[test]
    fn the_senders_are_served_in_turn_each_in_its_order() {
        let r = one_group(&[3, 4, 5, 6]);
        let inbox = r.inbox(4).expect("inbox");
        let send = |from, data: &[u8]| {
            r.forward(&rw(from, 7, data.len()), data).expect("room");
        };
        for d in [b"a1", b"a2", b"a3"] {
            send(3, d);
        }
        for d in [b"b1", b"b2"] {
            send(5, d);
        }
        send(6, b"c1");
        let order = |inbox: &Inbox| -> Vec<String> {
            drain(inbox, usize::MAX)
                .into_iter()
                .map(|(_, d)| String::from_utf8(d).expect("utf-8"))
                .collect()
        };
        assert_eq!(order(inbox), ["a1", "b1", "c1", "a2", "b2", "a3"]);
        assert!(inbox.is_empty());
        // A sender whose FIFO was emptied takes its turn after those that wait already.
        send(3, b"a4");
        send(5, b"b3");
        assert_eq!(inbox.pop(usize::MAX).expect("a4").data, b"a4");
        send(3, b"a5");
        send(6, b"c2");
        assert_eq!(order(inbox), ["b3", "a5", "c2"]);
    }

    #[test]
    fn a_packet_cut_in_pieces_takes_turns_with_the_other_senders() {
        let r = one_group(&[3, 4, 5]);
        let inbox = r.inbox(4).expect("inbox");
        let msg = |from, data: &[u8]| Header {
            type_: TYPE_SEQPACKET,
            flags: SEQ_EOM,
            ..rw(from, 7, data.len())
        };
        r.forward(&msg(3, b"0123456789"), b"0123456789")
            .expect("room");
        r.forward(&msg(5, b"abcdef"), b"abcdef").expect("room");
        r.forward(&msg(3, b"xy"), b"xy").expect("room");
        let pieces: Vec<_> = std::iter::from_fn(|| inbox.pop(4))
            .map(|p| (p.hdr.src_cid, p.hdr.len, p.hdr.flags, p.data))
            .collect();
        assert_eq!(
            pieces,
            [
                (3, 4, 0, b"0123".to_vec()),
                (5, 4, 0, b"abcd".to_vec()),
                (3, 4, 0, b"4567".to_vec()),
                (5, 2, SEQ_EOM, b"ef".to_vec()),
                (3, 2, SEQ_EOM, b"89".to_vec()),
                (3, 2, SEQ_EOM, b"xy".to_vec()),
            ]
        );
        assert!(inbox.is_empty());
        let bytes: Vec<usize> = inbox.lock().senders.values().map(|s| s.bytes).collect();
        assert_eq!(bytes, [0, 0], "every piece's bytes given back");
    }

    #[test]
    fn each_senders_bounds_hold_at_their_edges() {
        let r = one_group(&[3, 4, 5]);
        let inbox = r.inbox(4).expect("inbox");
        // Bytes: VM 3 fills its room exactly.
        let big = vec![0u8; 64 * 1024];
        for _ in 0..INBOX_SENDER_MAX_BYTES / big.len() {
            r.forward(&rw(3, 7, big.len()), &big).expect("room");
        }
        assert_eq!(inbox.lock().senders[&3].bytes, INBOX_SENDER_MAX_BYTES);
        assert_eq!(r.forward(&rw(3, 7, 1), b"x"), Err(ForwardError::Full));
        r.forward(&rw(3, 7, 0), &[]).expect("no bytes: fits");
        // A piece taken makes room for as many bytes, no more.
        assert_eq!(inbox.pop(1000).expect("piece").data.len(), 1000);
        let more = vec![1u8; 1001];
        assert_eq!(r.forward(&rw(3, 7, 1001), &more), Err(ForwardError::Full));
        r.forward(&rw(3, 7, 1000), &more[..1000]).expect("room");
        // Packets: VM 5 fills its room exactly; one taken makes room for one.
        for _ in 0..INBOX_SENDER_MAX_PACKETS {
            r.forward(&rw(5, 9, 0), &[]).expect("room");
        }
        assert_eq!(r.forward(&rw(5, 9, 0), &[]), Err(ForwardError::Full));
        assert_eq!(waiting(inbox, 5), INBOX_SENDER_MAX_PACKETS);
        let turns: Vec<u64> = std::iter::from_fn(|| inbox.pop(usize::MAX))
            .take(2)
            .map(|p| p.hdr.src_cid)
            .collect();
        assert_eq!(turns, [3, 5], "3 was waiting when 5 came");
        r.forward(&rw(5, 9, 0), &[]).expect("room for one");
        assert_eq!(r.forward(&rw(5, 9, 0), &[]), Err(ForwardError::Full));
        // No sender past max_senders (the router lets none through; the inbox holds anyway).
        let stranger = Forwarded {
            hdr: rw(9, 7, 0),
            data: Vec::new(),
        };
        assert!(!inbox.push(stranger.clone(), 0));
        assert!(!inbox.push(stranger.clone(), INBOX_RESERVED_RSTS));
        drain(inbox, usize::MAX);
        assert!(
            !inbox.push(stranger.clone(), 0),
            "nor when they have none waiting"
        );
        assert!(r.inbox(3).expect("inbox").push(stranger, 0), "room for one");
    }

    #[test]
    fn clear_drops_every_senders_packets() {
        let r = one_group(&[3, 4, 5]);
        let inbox = r.inbox(4).expect("inbox");
        for from in [3, 5] {
            while r.forward(&rw(from, 7, 1), b"x").is_ok() {}
            assert!(r.reset_receiver(&rw(from, 7, 1)));
        }
        inbox.clear();
        assert!(inbox.is_empty());
        assert!(inbox.pop(usize::MAX).is_none());
        // Every sender has all its room again.
        for from in [3, 5] {
            let mut sent = 0;
            while r.forward(&rw(from, 7, 1), b"x").is_ok() {
                sent += 1;
            }
            assert_eq!(sent, INBOX_SENDER_MAX_PACKETS);
        }
        assert!(!inbox.is_empty());
    }

    #[test]
    fn a_full_inbox_keeps_room_for_the_receivers_rsts() {
        let r = one_group(&[3, 4, 5]);
        let hdr = rw(3, 7, 1);
        while r.forward(&hdr, b"x").is_ok() {}
        let inbox = r.inbox(4).expect("inbox");
        assert_eq!(waiting(inbox, 3), INBOX_SENDER_MAX_PACKETS);
        let mut rsts = 0;
        while r.reset_receiver(&hdr) {
            rsts += 1;
        }
        assert_eq!(rsts, INBOX_RESERVED_RSTS, "bounded too");
        let last = inbox.lock().senders[&3]
            .packets
            .back()
            .cloned()
            .expect("rst");
        assert_eq!(
            (
                last.hdr.op,
                last.hdr.src_cid,
                last.hdr.dst_cid,
                last.hdr.len
            ),
            (OP_RST, 3, 4, 0)
        );
        assert_eq!((last.hdr.src_port, last.hdr.dst_port), (7, 8));
        // The room is each sender's: VM 3's RSTs took none of VM 5's.
        let other = rw(5, 9, 1);
        while r.forward(&other, b"x").is_ok() {}
        let mut rsts = 0;
        while r.reset_receiver(&other) {
            rsts += 1;
        }
        assert_eq!(rsts, INBOX_RESERVED_RSTS);
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
