//! Agent frames: arbitrary bytes, fed to the one-shot decoder frame after frame and to the
//! accumulating `Decoder` in chunks.
//!
//! The invariants live in `vmlink_proto::agent::fuzzing::check_agent_frames`, shared with the
//! stable test `crates/vmlink-proto/tests/agent_invariants.rs`: no panic; a frame takes at most
//! `HEADER_LEN + MAX_FRAME_LEN` bytes and no more than were given; a decoded message re-encodes
//! and decodes to itself; header errors are decided when the 12-byte header has arrived, other
//! outcomes when the whole frame has, never earlier; the accumulator gives the same messages
//! and the same error however the input is split; error messages are one bounded line. Every
//! message type is reached (1..=22: the exec, copy, `Resize`, `Run` and `Logs` messages and
//! `Hello` with features); the stable test seeds valid exec, `Resize`, `Run` and `Logs` frames.
//!
//! Run: `cargo +nightly fuzz run agent_frames` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmlink_proto::agent::fuzzing::check_agent_frames(data);
});
