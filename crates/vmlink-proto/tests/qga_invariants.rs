//! Runs the `qga_stream` fuzz target's invariant checks over deterministic pseudo-random inputs,
//! so they hold on stable Rust in CI even where `cargo fuzz` (nightly) cannot run.

use vmlink_proto::qga::fuzzing::check_qga_stream;

use vmlink_proto::fuzzing::XorShift;

/// Requests and near-requests, so most inputs reach the request checks.
const SEEDS: &[&[u8]] = &[
    br#"{"execute":"guest-ping"}"#,
    br#"{"execute":"guest-sync","arguments":{"id":5},"id":"x"}"#,
    b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1}}",
    br#"{'execute':'a\'b"c'}"#,
    br#"{"execute":1}"#,
    br#"[1,{"a":"}"}]"#,
    b"}} 42 null \"s\" ",
    br#"{"id":"\\\"}","execute":"x"}"#,
];

/// Bytes a mutation inserts: JSON's structure plus troublemakers.
const ALPHABET: &[u8] = b"{}[]\"'\\:, \n0123456789-e.abcnul\xff\x00";

fn input(rng: &mut XorShift) -> Vec<u8> {
    let mut data = vec![rng.next() as u8];
    for _ in 0..=rng.below(4) {
        let mut piece = SEEDS[rng.below(SEEDS.len())].to_vec();
        for _ in 0..rng.below(4) {
            let at = rng.below(piece.len() + 1);
            let byte = ALPHABET[rng.below(ALPHABET.len())];
            match rng.below(3) {
                0 => piece.insert(at, byte),
                1 if at < piece.len() => piece[at] = byte,
                _ if at < piece.len() => {
                    piece.remove(at);
                }
                _ => piece.push(byte),
            }
        }
        data.extend(piece);
    }
    if rng.below(4) == 0 {
        data.extend((0..rng.below(64)).map(|_| ALPHABET[rng.below(ALPHABET.len())]));
    }
    data
}

#[test]
fn qga_stream_invariants_hold_on_pseudo_random_inputs() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..5_000 {
        check_qga_stream(&input(&mut rng));
    }
}

#[test]
fn qga_stream_invariants_hold_on_degenerate_inputs() {
    check_qga_stream(b"");
    check_qga_stream(&[0]);
    check_qga_stream(&[0; 100]);
    check_qga_stream(&[0xff; 100]);
    let mut deep = vec![3u8];
    deep.extend(vec![b'['; 3000]);
    deep.extend(vec![b']'; 3000]);
    check_qga_stream(&deep);
}
