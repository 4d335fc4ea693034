//! The TX-path fuzz harness (`fuzz/fuzz_targets/vhost_tx.rs`) on pseudo-random inputs, so that
//! CI runs it on stable: hostile rings and headers are dropped and counted, never a panic, and
//! the device stays within its bounds.

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

#[test]
fn hostile_tx_rings_never_panic_and_stay_bounded() {
    let mut h = TxHarness::new().expect("harness");
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    for i in 0..3000 {
        let input = if i % 2 == 0 {
            structured(&mut r)
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
    assert!(h.device().connection_count() <= 64);
}
