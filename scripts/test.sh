#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the integration
# tests that boot real QEMU guests (vsock, virtio-serial, relays with socat).
# Run as root on Debian 12; installs missing system packages first.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc -D warnings (broken intra-doc links, stray HTML in doc comments)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked -q
echo "== cargo build (tests, and the binaries the guest tests run)"
cargo build --workspace --all-targets --locked
echo "== lab prepare (kernel and initramfs cache)"
cargo run -q --locked -p vmlink -- lab prepare
echo "== static agent: build (target/static), no dynamic interpreter, ping/exec in a guest"
bash scripts/static-agent.sh
echo "== tests (unit, host, and real-guest integration tests)"
# Guest tests whose guest timed out (its kernel stalled under TCG, or it hung silently) are run
# once more and listed here (vmlink_lab::testing::retry_log), each with the last lines of its
# first attempt (the guest console tail); shown after the tests.
RETRIES="${TMPDIR:-/tmp}/vmlink-lab-guest-retries.log"
rm -f "$RETRIES"
show_retries() {
    if [ -s "$RETRIES" ]; then
        echo "== $(grep -vc '^  | ' "$RETRIES") guest test(s) run a second time after the guest timed out:"
        sed 's/^/   /' "$RETRIES"
    else
        echo "== no guest test needed a second run"
    fi
}
trap show_retries EXIT
if command -v cargo-nextest >/dev/null; then
    # Each guest test boots its own QEMU guest (~5 s under TCG); two at a time
    # fit 2 cores.
    cargo nextest run --workspace --locked --test-threads 2 --no-fail-fast
    cargo test --workspace --locked --doc
else
    cargo test --workspace --locked -- --test-threads 2
fi
echo "== micro-benchmarks (criterion), each run once as a test: they build and assert"
cargo test --workspace --locked --bench '*'
