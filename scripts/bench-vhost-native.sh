#!/usr/bin/env bash
# vmlink-vhost against vhost-device-vsock with the native driver instead of a guest: the
# `vsock_driver` example is the VMM (vhost-user frontend) and the guest's virtio-vsock driver,
# so the figures are the backends' own cost, as a fast (KVM) guest would expose it. No QEMU,
# no guest, no AF_VSOCK.
#
#   scripts/bench-vhost-native.sh VDV [BYTES] [ROUNDS] [ROUND_TRIPS] [CONNS]
#                                                  defaults: 256M 5 2000 100
#
# Each round starts each backend fresh (own temp dir, guest CID 3), runs the driver against it
# (upload and download of BYTES, ROUND_TRIPS 1-byte round trips, CONNS concurrent host -> guest
# connections moving BYTES in total), stops it, and alternates which backend goes first. The
# driver reads each backend's CPU time per workload from /proc/PID/stat; the script also takes
# the backend's whole-run CPU. Prints per-round ratios vmlink-vhost / vhost-device-vsock and
# their medians. Release builds (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
VDV=${1:?usage: scripts/bench-vhost-native.sh PATH-TO-vhost-device-vsock [BYTES] [ROUNDS] [ROUND_TRIPS] [CONNS]}
BYTES=${2:-256M}
ROUNDS=${3:-5}
RTS=${4:-2000}
CONNS=${5:-100}
cargo build --release -q -p vmlink-vhost --bin vmlink-vhost --example vsock_driver
VH=target/release/vmlink-vhost
DRV=target/release/examples/vsock_driver
D=$(mktemp -d /tmp/vmlink-vhost-native.XXXXXX)
BPID=
cleanup() { [ -n "$BPID" ] && kill "$BPID" 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run() { # round name: one JSON line in $D/results
    local r=$1 n=$2 dir="$D/$1-$2" t0 t1 out
    mkdir -p "$dir"
    if [ "$n" = vdv ]; then
        "$VDV" --guest-cid 3 --socket "$dir/v.sock" --uds-path "$dir/v.vsock" 2>"$dir/log" &
    else
        "$VH" --vm "guest-cid=3,socket=$dir/v.sock,uds-path=$dir/v.vsock" 2>"$dir/log" &
    fi
    BPID=$!
    for _ in $(seq 500); do [ -S "$dir/v.sock" ] && break; sleep 0.01; done
    [ -S "$dir/v.sock" ] || { echo "$n never listened on $dir/v.sock" >&2; cat "$dir/log" >&2; exit 1; }
    t0=$(ticks "$BPID")
    if ! out=$("$DRV" --socket "$dir/v.sock" --uds-path "$dir/v.vsock" --bytes "$BYTES" \
        --round-trips "$RTS" --conns "$CONNS" --backend-pid "$BPID" --json 2>"$dir/driver.err"); then
        echo "round $r, $n: the driver failed:" >&2; cat "$dir/driver.err" "$dir/log" >&2; exit 1
    fi
    t1=$(ticks "$BPID")
    kill "$BPID"; wait "$BPID" 2>/dev/null || true; BPID=
    echo "$r $n ${out%\}}, \"backend_ticks\": $((t1 - t0))}" >>"$D/results"
    echo "round $r $n: $(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print("up %.0f MiB/s, down %.0f MiB/s, rtt %.1f us, conns %.0f MiB/s, unclean %d" % (
    d["upload"]["mib_s"], d["download"]["mib_s"], d["round_trips"]["median_us"],
    d["concurrent"]["mib_s"], len(d["unclean"])))' "$out")"
}
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="vmlink-vhost vdv"; else order="vdv vmlink-vhost"; fi
    for n in $order; do run "$r" "$n"; done
done

python3 - "$D/results" "$BYTES" "$RTS" "$CONNS" "$(getconf CLK_TCK)" <<'PY'
import collections, json, statistics, sys
rows, rounds = {}, []
for line in open(sys.argv[1]):
    r, n, js = line.split(" ", 2)
    rows[(r, n)] = json.loads(js)
    rounds += [r] if r not in rounds else []
hz = float(sys.argv[5])
cols = [
    ("up MiB/s", lambda d: d["upload"]["mib_s"]),
    ("down MiB/s", lambda d: d["download"]["mib_s"]),
    ("RTT p50 us", lambda d: d["round_trips"]["median_us"]),
    ("RTT p99 us", lambda d: d["round_trips"]["p99_us"]),
    (f"{sys.argv[4]} conns MiB/s", lambda d: d["concurrent"]["mib_s"]),
    ("CPU s/up", lambda d: d["upload"]["backend_cpu_s"]),
    ("CPU s/down", lambda d: d["download"]["backend_cpu_s"]),
    ("CPU s/conns", lambda d: d["concurrent"]["backend_cpu_s"]),
    ("CPU s/run", lambda d: d["backend_ticks"] / hz),
]
names = ["vmlink-vhost", "vdv"]
print()
print(f"native driver, {len(rounds)} rounds, {sys.argv[2]} each way, {sys.argv[3]} round trips, "
      f"{sys.argv[4]} connections; medians")
print(f"{'backend':13}" + "".join(f"{c:>16}" for c, _ in cols))
for n in names:
    m = [statistics.median(f(rows[(r, n)]) for r in rounds) for _, f in cols]
    print(f"{n:13}" + "".join(f"{v:16.3f}" if "CPU" in c else f"{v:16.1f}" for v, (c, _) in zip(m, cols)))
print()
print("per-round ratios vmlink-vhost / vdv (throughput: higher is better; RTT, CPU: lower is better)")
print(f"{'round':13}" + "".join(f"{c:>16}" for c, _ in cols))
ratios = collections.defaultdict(list)
for r in rounds:
    vals = []
    for c, f in cols:
        a, b = f(rows[(r, "vmlink-vhost")]), f(rows[(r, "vdv")])
        x = a / b if b else float("nan")
        ratios[c].append(x)
        vals.append(x)
    print(f"{r:13}" + "".join(f"{v:15.2f}x" for v in vals))
print(f"{'median':13}" + "".join(f"{statistics.median(ratios[c]):15.2f}x" for c, _ in cols))
for n in names:
    bad = [(r, u) for r in rounds for u in rows[(r, n)]["unclean"]]
    for r, u in bad:
        print(f"round {r}, {n}: connection not closed cleanly: {u}")
    inv = [rows[(r, n)]["driver"]["invalid_op_packets"] for r in rounds]
    if any(inv):
        print(f"{n}: packets with an op Linux does not know, per round: {inv}; first: "
              f"{rows[(rounds[0], n)]['driver']['first_invalid_op']}")
PY
