//! Runs the `agent_frames` fuzz target's invariant checks over deterministic pseudo-random
//! inputs, so they are checked on stable Rust in CI even where `cargo fuzz` (nightly) cannot run.

use vmlink_proto::agent::fuzzing::check_agent_frames;
use vmlink_proto::agent::{
    decode, encode_header, Exec, Exit, FrameError, Hello, Logs, Message, MessageType, Run, Signal,
    StdinAck, WindowSize, HEADER_LEN,
};

use vmlink_proto::fuzzing::XorShift;

/// Valid frames, so most inputs get past the header.
fn seeds() -> Vec<Vec<u8>> {
    let messages = [
        Message::Hello(Hello {
            version: 1,
            software: "vmlink".into(),
            features: vec!["tty".into(), "logs".into()],
        }),
        Message::Ping,
        Message::Pong,
        Message::InfoRequest,
        Message::Exec(Exec {
            argv: vec!["cat".into()],
            stdin: true,
            ..Exec::default()
        }),
        Message::Stdin(b"data".to_vec()),
        Message::StdinEof,
        Message::Stdout(vec![7; 40]),
        Message::Exit(Exit {
            code: Some(0),
            signal: None,
        }),
        Message::Signal(Signal { signo: 9 }),
        Message::StdinAck(StdinAck { bytes: 4096 }),
        Message::Exec(Exec {
            argv: vec!["sh".into()],
            tty: true,
            window: Some(WindowSize { rows: 24, cols: 80 }),
            user: Some("nobody".into()),
            ..Exec::default()
        }),
        Message::Resize(WindowSize {
            rows: 50,
            cols: 200,
        }),
        Message::Run(Run {
            exec: Exec {
                argv: vec!["script.sh".into(), "a".into()],
                ..Exec::default()
            },
            size: 10,
        }),
        Message::Logs(Logs {
            path: "/var/log/messages".into(),
            lines: 10,
            follow: true,
        }),
    ];
    messages
        .iter()
        .map(|m| m.encode().expect("encodes"))
        .collect()
}

fn input(rng: &mut XorShift, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = vec![rng.byte()];
    for _ in 0..1 + rng.below(4) {
        let mut frame = seeds[rng.below(seeds.len())].clone();
        match rng.below(6) {
            // As is.
            0 | 1 => {}
            // A byte flipped: header or payload.
            2 | 3 => {
                let at = rng.below(frame.len());
                frame[at] = rng.byte();
            }
            // A header with a random length field.
            4 => {
                let len = if rng.below(2) == 0 {
                    rng.below(64) as u32
                } else {
                    rng.next() as u32
                };
                frame[8..12].copy_from_slice(&len.to_le_bytes());
            }
            // Noise.
            _ => frame = (0..rng.below(40)).map(|_| rng.byte()).collect(),
        }
        data.extend(frame);
    }
    if rng.below(3) == 0 {
        data.truncate(1 + rng.below(data.len()));
    }
    data
}

fn outcome(payload: &[u8]) -> usize {
    match decode(payload) {
        Ok(None) => 0,
        Ok(Some(_)) => 1,
        Err(
            FrameError::BadMagic { .. }
            | FrameError::BadVersion { .. }
            | FrameError::UnknownType { .. }
            | FrameError::BadFlags { .. },
        ) => 2,
        Err(FrameError::TooLong { .. } | FrameError::UnexpectedPayload { .. }) => 3,
        Err(FrameError::BadPayload { .. } | FrameError::Invalid { .. }) => 4,
        Err(e) => panic!("decode returned {e:?}"),
    }
}

#[test]
fn invariants_hold_on_pseudo_random_inputs() {
    let seeds = seeds();
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut seen = [0u32; 5];
    for _ in 0..5_000 {
        let data = input(&mut rng, &seeds);
        check_agent_frames(&data);
        seen[outcome(&data[1..])] += 1;
    }
    assert!(seen.iter().all(|&n| n >= 50), "outcome counts {seen:?}");
}

#[test]
fn invariants_hold_on_degenerate_inputs() {
    check_agent_frames(b"");
    check_agent_frames(&[0]);
    check_agent_frames(&[0; 100]);
    check_agent_frames(&[0xff; 100]);
    check_agent_frames(b"\x01VMLA\x01\x09\0\0\xff\xff\xff\xff");
    let mut h = encode_header(MessageType::Exec, 2)
        .expect("header")
        .to_vec();
    h.extend_from_slice(b"{}");
    assert_eq!(h.len(), HEADER_LEN + 2);
    check_agent_frames(&[[0u8].as_slice(), &h].concat());
}
