//! qemu-ga's JSON stream: arbitrary bytes through the framing `Decoder` whole and in chunks,
//! then each framed message through the request checks and back out as an answer.
//!
//! The invariants live in `vmlink_proto::qga::fuzzing::check_qga_stream`, shared with the
//! stable test `crates/vmlink-proto/tests/qga_invariants.rs`: no panic; bounded buffering; the
//! same frames however the input is split; one error per 0xFF; answers parse back.
//!
//! Run: `cargo +nightly fuzz run qga_stream` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmlink_proto::qga::fuzzing::check_qga_stream(data);
});
