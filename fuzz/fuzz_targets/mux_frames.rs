//! vmux lane bytes (docs/serial-mux.md): arbitrary input, decoded whole and in pieces.
//!
//! The invariants live in `vmlink_proto::mux::fuzzing::check_mux_frames`, shared with the
//! stable test `crates/vmlink-proto/tests/mux_invariants.rs`: no panic; the same events however
//! the input is split; every byte accounted for; frames within their bounds, re-encoding to the
//! bytes they came from; bounded buffering.
//!
//! Run: `cargo +nightly fuzz run mux_frames` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmlink_proto::mux::fuzzing::check_mux_frames(data);
});
