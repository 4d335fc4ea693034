//! Micro-benchmarks of the sans-IO codecs on the hot paths of a copy: the agent's `Data`
//! frames (two ways of reading them, side by side), the serial mux's lane decoder, and the
//! hybrid vsock `CONNECT` parser. `cargo bench -p vmlink-proto --bench codec`; CI runs them
//! once each with `-- --test`. Figures: docs/benchmarks.md, "Micro-benchmarks".

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vmlink_proto::agent::{Decoder, Message};
use vmlink_proto::hybrid::{parse_request, Parsed};
use vmlink_proto::mux::{frame, Event, Header, Kind, LaneDecoder, MAX_DATA};

/// What a copy's sender writes per frame (`vmlink-agent`'s COPY_CHUNK).
const PAYLOAD: usize = 256 * 1024;
/// Frames per iteration.
const FRAMES: usize = 16;
/// What one read from a socket returns, at most.
const READ: usize = 64 * 1024;

fn data_stream() -> Vec<u8> {
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7) as u8).collect();
    let mut out = Vec::new();
    for _ in 0..FRAMES {
        Message::Data(payload.clone())
            .encode_into(&mut out)
            .expect("a 256 KiB Data frame encodes");
    }
    out
}

/// Every `Data` payload's length, summed; panics on anything else.
fn payload_len(m: Message) -> usize {
    match m {
        Message::Data(d) => d.len(),
        other => panic!("decoded {other:?}, not Data"),
    }
}

fn agent_frames(c: &mut Criterion) {
    let wire = data_stream();
    let mut g = c.benchmark_group("agent_data_frames");
    g.throughput(Throughput::Bytes((PAYLOAD * FRAMES) as u64));
    g.bench_function("encode_256k", |b| {
        let payload = Message::Data(vec![1u8; PAYLOAD]);
        let mut out = Vec::with_capacity(PAYLOAD + 64);
        b.iter(|| {
            for _ in 0..FRAMES {
                out.clear();
                payload.encode_into(&mut out).expect("encodes");
                black_box(&out);
            }
        })
    });
    // The plain way: every read appended to the decoder, whole messages taken out (the payload
    // is copied from the read buffer into the decoder, then into the message).
    g.bench_function("decode_256k_whole_frames", |b| {
        b.iter(|| {
            let mut d = Decoder::new();
            let mut got = 0;
            for piece in wire.chunks(READ) {
                d.extend(piece);
                while let Some(m) = d.next_message().expect("valid frames") {
                    got += payload_len(m);
                }
            }
            assert_eq!(got, PAYLOAD * FRAMES);
        })
    });
    // What `FrameReader` does: a big payload is read straight into the message's buffer
    // (`take_partial_raw`), then the next header alone.
    g.bench_function("decode_256k_partial_raw", |b| {
        b.iter(|| {
            let mut d = Decoder::new();
            let mut got = 0;
            let mut at = 0;
            while at < wire.len() {
                let n = READ.min(wire.len() - at).min(12);
                d.extend(&wire[at..at + n]);
                at += n;
                if let Some((ty, len, mut payload)) = d.take_partial_raw().expect("valid") {
                    let rest = len - payload.len();
                    // The socket's read(2) into the message's own buffer.
                    for piece in wire[at..at + rest].chunks(READ) {
                        payload.extend_from_slice(piece);
                    }
                    at += rest;
                    got += payload_len(Message::from_raw(ty, payload).expect("raw type"));
                }
                while let Some(m) = d.next_message().expect("valid frames") {
                    got += payload_len(m);
                }
            }
            assert_eq!(got, PAYLOAD * FRAMES);
        })
    });
    g.finish();
}

fn mux_lane(c: &mut Criterion) {
    let payload = vec![5u8; MAX_DATA];
    let mut wire = frame(Header::hello(false), &[]);
    let frames = 64;
    for i in 0..frames {
        wire.extend(frame(
            Header::new(Kind::Data, 1, MAX_DATA as u32, (i * MAX_DATA) as u64),
            &payload,
        ));
    }
    let mut g = c.benchmark_group("mux_lane");
    g.throughput(Throughput::Bytes((MAX_DATA * frames) as u64));
    g.bench_function("decode_64k_data_frames", |b| {
        b.iter(|| {
            let mut d = LaneDecoder::new();
            let mut got = 0;
            for piece in wire.chunks(256 * 1024) {
                d.push(piece);
                while let Some(e) = d.next_event() {
                    match e {
                        Event::Frame(h, p) if h.kind == Kind::Data => got += p.len(),
                        Event::Frame(..) => {}
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert_eq!(got, MAX_DATA * frames);
        })
    });
    g.finish();
}

fn hybrid(c: &mut Criterion) {
    c.bench_function("hybrid_parse_connect", |b| {
        b.iter(|| match parse_request(black_box(b"CONNECT 52000\n")) {
            Ok(Parsed::Complete { value, consumed }) => {
                assert_eq!((value.port, consumed), (52000, 14));
            }
            other => panic!("{other:?}"),
        })
    });
}

criterion_group!(benches, agent_frames, mux_lane, hybrid);
criterion_main!(benches);
