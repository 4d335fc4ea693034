//! Runs the `mux_frames` fuzz target's invariant checks over deterministic pseudo-random
//! inputs, so they hold on stable Rust in CI even where `cargo fuzz` (nightly) cannot run.

use vmlink_proto::fuzzing::XorShift;
use vmlink_proto::mux::fuzzing::check_mux_frames;
use vmlink_proto::mux::{frame, Header, Kind};

fn piece(rng: &mut XorShift) -> Vec<u8> {
    let id = rng.below(4) as u32;
    let mut f = match rng.below(7) {
        0 => frame(Header::hello(rng.below(2) == 1), &[]),
        1 => frame(Header::new(Kind::Open, id, 0, 0), &[]),
        2 => {
            let n = 1 + rng.below(64);
            let p: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            frame(Header::new(Kind::Data, id, n as u32, rng.next() % 4096), &p)
        }
        3 => frame(Header::new(Kind::Credit, id, 0, rng.next()), &[]),
        4 => frame(Header::new(Kind::Fin, id, 0, rng.next() % 4096), &[]),
        5 => frame(Header::new(Kind::Rst, id, 3, 0), b"bye"),
        _ => (0..rng.below(30)).map(|_| rng.byte()).collect(),
    };
    // Sometimes break it.
    if !f.is_empty() && rng.below(4) == 0 {
        let at = rng.below(f.len());
        match rng.below(3) {
            0 => f[at] = rng.byte(),
            1 => f.truncate(at),
            _ => f.insert(at, rng.byte()),
        }
    }
    f
}

#[test]
fn mux_frames_invariants_hold_for_pseudo_random_inputs() {
    let mut rng = XorShift(0x6d75_7866_0123_4567);
    for _ in 0..3000 {
        let mut data = Vec::new();
        for _ in 0..=rng.below(8) {
            data.extend(piece(&mut rng));
        }
        check_mux_frames(&data);
    }
}
