//! The TX-path fuzz harness (`fuzz/fuzz_targets/vhost_tx.rs`) on pseudo-random inputs, so that
//! CI runs it on stable: hostile rings and headers are dropped and counted, never a panic, and
//! the device stays within its bounds; and the harness's host listeners let connections open,
//! so that the established-connection code runs too.

use vmlink_vhost::counters::Counter;
use vmlink_vhost::fuzzing::{TxHarness, DATA};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// An input whose descriptors mostly point into the data area, with headers that are often
/// from the right CID, so that the parser and the device model get past their first checks.
fn structured(r: &mut Rng) -> Vec<u8> {
    let n = (r.next() % 17) as u8;
    let mut v = vec![n];
    for i in 0..n {
        let addr = if r.next() % 8 == 0 {
            r.next()
        } else {
            DATA + (r.next() % 64) * 0x100
        };
        let len = match r.next() % 4 {
            0 => 44,
            1 => (r.next() % 0x200) as u32,
            2 => u32::MAX - (r.next() % 4) as u32,
            _ => r.next() as u32,
        };
        let flags = (r.next() % 8) as u16;
        let next = if r.next() % 4 == 0 {
            r.next() as u16
        } else {
            u16::from(i) + 1
        };
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
    }
    let k = (r.next() % 17) as u8;
    v.push(k);
    for _ in 0..k {
        v.push((r.next() % 20) as u8);
    }
    // 64 packet headers of 0x100 bytes each, then noise.
    for _ in 0..64 {
        let mut h = [0u8; 0x100];
        for b in h.iter_mut() {
            *b = r.next() as u8;
        }
        // A small `len`, so that the packet fits its descriptors more often than not.
        h[24..28].copy_from_slice(&((r.next() % 0x80) as u32).to_le_bytes());
        if r.next() % 2 == 0 {
            h[0..8].copy_from_slice(&3u64.to_le_bytes());
            h[8..16].copy_from_slice(&2u64.to_le_bytes());
            h[24..28].copy_from_slice(&((r.next() % 0x80) as u32).to_le_bytes());
            h[28..30].copy_from_slice(&((r.next() % 3) as u16).to_le_bytes());
            h[30..32].copy_from_slice(&((r.next() % 9) as u16).to_le_bytes());
            h[16..20].copy_from_slice(&((r.next() % 4) as u32).to_le_bytes());
            h[20..24].copy_from_slice(&((r.next() % 4) as u32).to_le_bytes());
        }
        v.extend_from_slice(&h);
    }
    v
}

/// Well-formed chains (a header descriptor, then a data descriptor when there is payload) with
/// a guest's conversation on a few ports: requests to the harness's listeners, data, credit,
/// shutdowns and resets, stream and seqpacket, with odd values mixed in. This is what reaches
/// the established-connection code.
fn conversation(r: &mut Rng) -> Vec<u8> {
    let mut descs: Vec<(u64, u32, u16, u16)> = Vec::new();
    let mut heads = Vec::new();
    let mut area = vec![0u8; 8 * 0x100];
    for i in 0..8usize {
        if descs.len() + 2 > 16 {
            break;
        }
        let at = DATA + (i as u64) * 0x100;
        let op = match r.next() % 16 {
            0..=3 => 1, // REQUEST
            4..=9 => 5, // RW
            10 => 4,    // SHUTDOWN
            11 => 3,    // RST
            12 => 6,    // CREDIT_UPDATE
            13 => 7,    // CREDIT_REQUEST
            14 => 2,    // RESPONSE
            _ => (r.next() % 12) as u16,
        };
        let len = if op == 5 { (r.next() % 200) as u32 } else { 0 };
        let port = (r.next() % 4) as u32;
        let type_: u16 = match r.next() % 8 {
            0..=3 => 1,
            4..=6 => 2,
            _ => (r.next() % 4) as u16,
        };
        // The listeners: stream on host ports 0-2, seqpacket on 3.
        let host_port = if type_ == 2 { 3 } else { port % 3 };
        let h = &mut area[i * 0x100..i * 0x100 + 44];
        h[0..8].copy_from_slice(&3u64.to_le_bytes());
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        h[16..20].copy_from_slice(&(port + 1000).to_le_bytes());
        h[20..24].copy_from_slice(&host_port.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&type_.to_le_bytes());
        h[30..32].copy_from_slice(&op.to_le_bytes());
        let flags = match op {
            4 => (r.next() % 4) as u32,
            5 if type_ == 2 => (r.next() % 4) as u32,
            _ => 0,
        };
        h[32..36].copy_from_slice(&flags.to_le_bytes());
        let buf_alloc: u32 = if r.next() % 8 == 0 {
            r.next() as u32
        } else {
            1 << 18
        };
        h[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
        h[40..44].copy_from_slice(&((r.next() % 4096) as u32).to_le_bytes());
        for b in &mut area[i * 0x100 + 44..i * 0x100 + 44 + len as usize] {
            *b = r.next() as u8;
        }
        let idx = descs.len() as u16;
        heads.push(idx as u8);
        if len == 0 {
            descs.push((at, 44, 0, 0));
        } else {
            descs.push((at, 44, 1, idx + 1));
            descs.push((at + 44, len, 0, 0));
        }
    }
    let mut v = vec![descs.len() as u8];
    for (addr, len, flags, next) in &descs {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
    }
    v.push(heads.len() as u8);
    v.extend_from_slice(&heads);
    v.extend_from_slice(&area);
    v
}

#[test]
fn hostile_tx_rings_never_panic_and_stay_bounded() {
    let mut h = TxHarness::new().expect("harness");
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..3000 {
        let input = if i % 3 == 0 {
            structured(&mut r)
        } else if i % 3 == 1 {
            conversation(&mut r)
        } else {
            let len = (r.next() % 600) as usize;
            (0..len).map(|_| r.next() as u8).collect()
        };
        h.run(&input);
    }
    let c = h.device().counters();
    assert!(c.get(Counter::tx_packets) > 1000, "{}", c.snapshot());
    assert!(
        c.get(Counter::malformed_descriptors) > 100,
        "{}",
        c.snapshot()
    );
    assert!(
        c.get(Counter::bad_packets) + c.get(Counter::spoofed_cid) > 100,
        "{}",
        c.snapshot()
    );
    // The established-connection code was reached: connections opened (the harness's host
    // listeners accepted them) and carried guest data, and the bound held.
    assert!(
        h.accepted() > 50,
        "accepted {}: {}",
        h.accepted(),
        c.snapshot()
    );
    assert!(c.get(Counter::connections_opened) > 50, "{}", c.snapshot());
    assert!(c.get(Counter::tx_bytes) > 0, "{}", c.snapshot());
    assert!(c.get(Counter::rx_bytes) > 0, "{}", c.snapshot());
    assert!(c.get(Counter::connections_closed) > 0, "{}", c.snapshot());
    assert!(h.device().connection_count() <= 64);
}
