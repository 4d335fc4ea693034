//! Runs the fuzz target's invariant checks over deterministic pseudo-random inputs, so they are
//! checked on stable Rust in CI even where `cargo fuzz` (nightly) cannot run.

use vmlink_proto::fuzzing::check_hybrid;
use vmlink_proto::hybrid::{parse_reply, parse_request, HandshakeError, Parsed, MAX_LINE_LEN};

use vmlink_proto::fuzzing::XorShift;

/// Lines near the grammar, so most inputs reach the port parser rather than failing at byte 0.
const SEEDS: &[&[u8]] = &[
    b"CONNECT 52\n",
    b"CONNECT 0\n",
    b"CONNECT 4294967295\n",
    b"CONNECT 4294967296\n",
    b"CONNECT 052\n",
    b"CONNECT 52\r\n",
    b"connect 52\n",
    b"CONNECT \n",
    b"OK 1073\n",
    b"OK 0\n",
    b"OK 4294967295\n",
    b"OK  1\n",
    b"\n",
    b"",
];

/// Bytes a mutation inserts: the grammar's alphabet plus troublemakers.
const ALPHABET: &[u8] = b"CONNECTOK 0123456789\n\r\t\0+-x\xff";

fn input(rng: &mut XorShift) -> Vec<u8> {
    let mut payload = match rng.below(4) {
        // Pure noise from the grammar's alphabet.
        0 => (0..rng.below(2 * MAX_LINE_LEN))
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect(),
        // Pure random bytes.
        1 => (0..rng.below(2 * MAX_LINE_LEN))
            .map(|_| rng.byte())
            .collect(),
        // A seed, as is or mutated.
        _ => {
            let mut line = rng.pick(SEEDS).to_vec();
            for _ in 0..rng.below(3) {
                let at = rng.below(line.len() + 1);
                let byte = ALPHABET[rng.below(ALPHABET.len())];
                match rng.below(3) {
                    0 => line.insert(at, byte),
                    1 if at < line.len() => line[at] = byte,
                    _ if at < line.len() => {
                        line.remove(at);
                    }
                    _ => line.push(byte),
                }
            }
            line
        }
    };
    // Often some data after the line, as a guest writing at once would send.
    if rng.below(2) == 0 {
        payload.extend((0..rng.below(16)).map(|_| rng.byte()));
    }

    // Chunk plan: up to 7 lengths, then the payload (see `check_hybrid`).
    let plan_len = rng.below(8);
    let mut data = vec![u8::try_from(plan_len).unwrap_or(0)];
    data.extend((0..plan_len).map(|_| rng.byte()));
    data.extend(payload);
    data
}

/// Which outcome a one-shot parse of the payload had, to show the generator reaches them all.
fn outcome<T>(result: Result<Parsed<T>, HandshakeError>) -> usize {
    match result {
        Ok(Parsed::Incomplete) => 0,
        Ok(Parsed::Complete { .. }) => 1,
        Err(HandshakeError::BadCommand { .. }) => 2,
        Err(HandshakeError::BadPort { .. }) => 3,
        Err(HandshakeError::LineTooLong { .. }) => 4,
        Err(error) => panic!("a parser returned {error:?}"),
    }
}

#[test]
fn invariants_hold_on_pseudo_random_inputs() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut seen = [[0u32; 5]; 2];
    for _ in 0..5_000 {
        let data = input(&mut rng);
        check_hybrid(&data);
        let payload = &data[1 + usize::from(data[0])..];
        seen[0][outcome(parse_request(payload))] += 1;
        seen[1][outcome(parse_reply(payload))] += 1;
    }
    // Each parser saw each outcome often enough for the run to mean something.
    for counts in seen {
        assert!(counts.iter().all(|&n| n >= 50), "outcome counts {counts:?}");
    }
}

#[test]
fn invariants_hold_on_seeds_fed_one_byte_at_a_time() {
    for seed in SEEDS {
        // Plan of one length-1 chunk: push one byte at a time.
        let mut data = vec![1, 1];
        data.extend_from_slice(seed);
        data.extend_from_slice(b"trailing data");
        check_hybrid(&data);
    }
}

#[test]
fn invariants_hold_on_degenerate_inputs() {
    check_hybrid(b"");
    check_hybrid(&[0]);
    check_hybrid(&[7; 3]);
    check_hybrid(&[0; 100]);
    check_hybrid(&[b'\n'; 100]);
    check_hybrid(&[0xff; 100]);
}
