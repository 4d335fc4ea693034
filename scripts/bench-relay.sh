#!/usr/bin/env bash
# Measures `vmlink relay` against socat (default options) on the same path in
# the same run, and both against the raw channel, on the host (Unix sockets
# and TCP loopback; no vsock on the host). Rounds alternate between the
# contenders so that machine noise hits all of them alike.
#
#   scripts/bench-relay.sh [BYTES] [ROUNDS]      defaults: 256M 3
#
# Prints one line per measurement and a summary with ratios (median of the
# rounds). Needs socat and a release build (cargo build --release -p vmlink).
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES=${1:-256M}
ROUNDS=${2:-3}
V=target/release/vmlink
[ -x "$V" ] || cargo build --release -q -p vmlink
command -v socat >/dev/null || { echo "bench-relay: needs socat (apt-get install socat)" >&2; exit 1; }
D=$(mktemp -d /tmp/vmlink-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT

wait_sock() { for _ in $(seq 500); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }
wait_tcp() { for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.01; done; echo "no tcp $1" >&2; exit 1; }

$V bench serve "unix-listen:$D/srv.sock" 2>/dev/null & PIDS+=($!)
wait_sock "$D/srv.sock"
# Unix -> Unix
$V relay "unix-listen:$D/vmlink.sock" "unix:$D/srv.sock" 2>/dev/null & PIDS+=($!)
socat "UNIX-LISTEN:$D/socat.sock,fork" "UNIX-CONNECT:$D/srv.sock" & PIDS+=($!)
# TCP -> Unix
$V relay tcp-listen:127.0.0.1:47301 "unix:$D/srv.sock" 2>/dev/null & PIDS+=($!)
socat TCP-LISTEN:47302,bind=127.0.0.1,fork,reuseaddr "UNIX-CONNECT:$D/srv.sock" & PIDS+=($!)
wait_sock "$D/vmlink.sock"; wait_sock "$D/socat.sock"; wait_tcp 47301; wait_tcp 47302

run() { # name addr
    local out
    out=$($V bench run "$2" --bytes "$BYTES" --round-trips 2000 --json)
    echo "$1 $out"
}
{
for r in $(seq "$ROUNDS"); do
    run raw-unix "unix:$D/srv.sock"
    run vmlink-unix "unix:$D/vmlink.sock"
    run socat-unix "unix:$D/socat.sock"
    run vmlink-tcp "tcp:127.0.0.1:47301"
    run socat-tcp "tcp:127.0.0.1:47302"
done
} | tee "$D/results"
python3 - "$D/results" "$BYTES" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    rows.setdefault(name, []).append(json.loads(js))
def med(name, key, sub=None):
    vals = [r[key][sub] if sub else r[key] for r in rows[name]]
    return statistics.median(vals)
print()
print(f"relay benchmark, {sys.argv[2]} each way, median of {len(rows['raw-unix'])} rounds")
print(f"{'path':<14} {'up MiB/s':>9} {'down MiB/s':>10} {'rtt p50 us':>10} {'rtt p99 us':>10}")
for n in rows:
    print(f"{n:<14} {med(n,'upload_mib_s'):>9.0f} {med(n,'download_mib_s'):>10.0f} {med(n,'latency_us','median'):>10.1f} {med(n,'latency_us','p99'):>10.1f}")
for path in ("unix", "tcp"):
    v, s = f"vmlink-{path}", f"socat-{path}"
    print(f"vmlink/socat ({path} front): up {med(v,'upload_mib_s')/med(s,'upload_mib_s'):.2f}x, down {med(v,'download_mib_s')/med(s,'download_mib_s'):.2f}x, rtt p50 {med(v,'latency_us','median')/med(s,'latency_us','median'):.2f}x")
print(f"vmlink relay / raw unix: up {med('vmlink-unix','upload_mib_s')/med('raw-unix','upload_mib_s'):.2f}, down {med('vmlink-unix','download_mib_s')/med('raw-unix','download_mib_s'):.2f}")
PY
