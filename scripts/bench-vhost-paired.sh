#!/usr/bin/env bash
# Paired comparison of vhost-user-vsock backends: one lab guest per backend, all booted at once
# and idle between measurements, then ROUNDS rounds that measure each backend in turn (1000
# 1-byte round trips, then BYTES each way). Pairs are measured seconds apart instead of a guest
# boot apart (scripts/bench-vhost.sh), so machine noise that lasts longer than that hits both
# sides of a pair alike. Also records each guest's CPU (its QEMU process) and each backend's.
#
#   scripts/bench-vhost-paired.sh VDV [BYTES] [ROUNDS]        defaults: 64M 8
#   VH_BASE=old/vmlink-vhost scripts/bench-vhost-paired.sh VDV  # adds vmlink-vhost-base
#
# Needs release builds of vmlink and vmlink-vhost (built here when missing). The guests take
# 3 x 512 MiB; while one is measured, the others idle (TCG guests at rest use little CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VDV=${1:?usage: scripts/bench-vhost-paired.sh PATH-TO-vhost-device-vsock [BYTES] [ROUNDS]}
BYTES=${2:-64M}
ROUNDS=${3:-8}
V=target/release/vmlink
VH=target/release/vmlink-vhost
[ -x "$V" ] && [ -x "$VH" ] || cargo build --release -q -p vmlink -p vmlink-vhost
D=$(mktemp -d /tmp/vmlink-vhost-paired.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A BIN KIND LAB BPID QPID
NAMES=(vmlink-vhost vdv)
BIN[vmlink-vhost]=$VH; KIND[vmlink-vhost]=vh
BIN[vdv]=$VDV; KIND[vdv]=vdv
if [ -n "${VH_BASE:-}" ]; then
    NAMES+=(vmlink-vhost-base); BIN[vmlink-vhost-base]=$VH_BASE; KIND[vmlink-vhost-base]=vh
fi
for n in "${NAMES[@]}"; do
    if [ "${KIND[$n]}" = vdv ]; then
        "${BIN[$n]}" --guest-cid 3 --socket "$D/$n.sock" --uds-path "$D/$n.vsock" 2>"$D/$n.log" &
    else
        "${BIN[$n]}" --vm "guest-cid=3,socket=$D/$n.sock,uds-path=$D/$n.vsock" 2>"$D/$n.log" &
    fi
    BPID[$n]=$!; PIDS+=($!)
    for _ in $(seq 1000); do [ -S "$D/$n.sock" ] && break; sleep 0.01; done
    $V lab run --timeout 0 --vhost-user-vsock "$D/$n.sock" -- \
        "$PWD/$V" bench serve vsock-listen:5000 >"$D/$n.guest.log" 2>&1 &
    LAB[$n]=$!; PIDS+=($!)
done
for n in "${NAMES[@]}"; do
    ok=
    for _ in $(seq 600); do
        $V bench run "hvsock:$D/$n.vsock:5000" --latency --round-trips 1 --json >/dev/null 2>&1 && { ok=1; break; }
        sleep 0.5
    done
    [ -n "$ok" ] || { echo "guest for $n never served" >&2; cat "$D/$n.log" "$D/$n.guest.log" >&2; exit 1; }
    QPID[$n]=$(pgrep -P "${LAB[$n]}" | head -1)
done
sleep 5 # let the boots settle

measure() { # round name kind bench-args...: one JSON line with the CPU ticks added
    local r=$1 n=$2 k=$3 q0 b0 q1 b1 out
    shift 3
    q0=$(ticks "${QPID[$n]}"); b0=$(ticks "${BPID[$n]}")
    out=$($V bench run "hvsock:$D/$n.vsock:5000" "$@" --json)
    q1=$(ticks "${QPID[$n]}"); b1=$(ticks "${BPID[$n]}")
    echo "$r $n $k ${out%\}}, \"guest_ticks\": $((q1 - q0)), \"backend_ticks\": $((b1 - b0))}" | tee -a "$D/results"
}
for r in $(seq "$ROUNDS"); do
    for n in "${NAMES[@]}"; do measure "$r" "$n" rtt --latency --round-trips 1000; done
    for n in "${NAMES[@]}"; do measure "$r" "$n" tp --throughput --bytes "$BYTES"; done
done

python3 - "$D/results" "$BYTES" "$(getconf CLK_TCK)" <<'PY'
import collections, json, statistics, sys
rows = collections.defaultdict(dict)
names, rounds = [], []
for line in open(sys.argv[1]):
    r, n, k, js = line.split(" ", 3)
    rows[(r, n)][k] = json.loads(js)
    names += [n] if n not in names else []
    rounds += [r] if r not in rounds else []
hz = float(sys.argv[3])
def get(r, n, what):
    d = rows[(r, n)]
    return {
        "rtt": lambda: d["rtt"]["latency_us"]["median"],
        "up": lambda: d["tp"]["upload_mib_s"],
        "down": lambda: d["tp"]["download_mib_s"],
        "guest_rtt": lambda: d["rtt"]["guest_ticks"] / hz,
        "guest_tp": lambda: d["tp"]["guest_ticks"] / hz,
        "backend_tp": lambda: d["tp"]["backend_ticks"] / hz,
    }[what]()
cols = ["rtt", "up", "down", "guest_rtt", "guest_tp", "backend_tp"]
print()
print(f"paired vhost-user-vsock benchmark, {len(rounds)} rounds, {sys.argv[2]} each way; medians")
print(f"{'backend':17} {'rtt us':>7} {'up MiB/s':>9} {'down MiB/s':>11} {'guest CPU s/1000 rt':>20} "
      f"{'guest CPU s/transfer':>21} {'backend CPU s/transfer':>23}")
for n in names:
    m = [statistics.median(get(r, n, c) for r in rounds) for c in cols]
    print(f"{n:17} {m[0]:7.0f} {m[1]:9.1f} {m[2]:11.1f} {m[3]:20.2f} {m[4]:21.2f} {m[5]:23.2f}")
for n in names:
    if n == "vdv":
        continue
    p = [statistics.median(get(r, n, c) / get(r, "vdv", c) for r in rounds) for c in cols[:3]]
    print(f"{n} / vdv, median of per-round ratios: rtt {p[0]:.2f}x, upload {p[1]:.2f}x, download {p[2]:.2f}x")
PY
