//! Hybrid vsock handshake: arbitrary bytes, split into arbitrary reads, through both parsers
//! (`parse_request`, `parse_reply`) and both accumulators (`Handshake<ConnectRequest>`,
//! `Handshake<ConnectReply>`).
//!
//! The invariants live in `vmlink_proto::fuzzing::check_hybrid`, shared with the stable test
//! `crates/vmlink-proto/tests/hybrid_invariants.rs`: no panic; `consumed <= len` and
//! `<= MAX_LINE_LEN`; a parsed line re-encodes to exactly the bytes consumed and parses back to the
//! same value; the outcome is decided exactly when the `\n` (or the 32nd byte) arrives; and the
//! accumulator gives the same value, error and leftover however the input is split.
//!
//! Run: `cargo +nightly fuzz run hybrid_handshake` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmlink_proto::fuzzing::check_hybrid(data);
});
