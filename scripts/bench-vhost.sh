#!/usr/bin/env bash
# Measures vmlink-vhost against vhost-device-vsock (VDV, a path to its binary) in the same run:
# each backend serves one lab guest running `vmlink bench serve vsock-listen:5000`; the host
# runs `vmlink bench run hvsock:UDS:5000` through the backend's hybrid socket (upload = host to
# guest, download = guest to host, 1-byte round trips), then N concurrent connections from one
# client (`bench run --conns N`).
#
#   scripts/bench-vhost.sh VDV [BYTES] [ROUNDS] [CONNS]      defaults: 256M 3 100
#
# Rounds alternate between the backends so that machine noise hits them alike; one backend and
# its guest run at a time (a guest booted fresh for each measurement). Prints one JSON
# line per measurement and a summary (medians), including each backend's CPU time (user +
# system) during the throughput and round-trip run, and its guest's (the QEMU process: under TCG,
# the guest's CPU is what bounds both), and the ratios to vdv paired round by round. Needs
# release builds of vmlink and vmlink-vhost (built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
VDV=${1:?usage: scripts/bench-vhost.sh PATH-TO-vhost-device-vsock [BYTES] [ROUNDS] [CONNS]}
BYTES=${2:-256M}
ROUNDS=${3:-3}
CONNS=${4:-100}
V=target/release/vmlink
VH=target/release/vmlink-vhost
[ -x "$V" ] && [ -x "$VH" ] || cargo build --release -q -p vmlink -p vmlink-vhost
D=$(mktemp -d /tmp/vmlink-vhost-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 1000); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }

start() { # name: starts the backend and its guest, waits until the guest's bench server answers
    local n=$1 cid=3
    rm -f "$D/$n.sock" "$D/$n.vsock"
    RUN=()
    case $n in
    vmlink-vhost) $VH --vm "guest-cid=$cid,socket=$D/$n.sock,uds-path=$D/$n.vsock" 2>"$D/$n.log" & ;;
    vmlink-vhost-1m) $VH --vm "guest-cid=$cid,socket=$D/$n.sock,uds-path=$D/$n.vsock,tx-buffer-size=1M" \
        2>"$D/$n.log" & ;;
    vmlink-vhost-base) "${VH_BASE:?vmlink-vhost-base needs VH_BASE=PATH (an older vmlink-vhost binary)}" \
        --vm "guest-cid=$cid,socket=$D/$n.sock,uds-path=$D/$n.vsock" 2>"$D/$n.log" & ;;
    vdv) "$VDV" --guest-cid $cid --socket "$D/$n.sock" --uds-path "$D/$n.vsock" 2>"$D/$n.log" & ;;
    vdv-256k) "$VDV" --guest-cid $cid --socket "$D/$n.sock" --uds-path "$D/$n.vsock" \
        --tx-buffer-size 262144 2>"$D/$n.log" & ;;
    esac
    PIDS+=($!); RUN+=($!)
    wait_sock "$D/$n.sock"
    $V lab run --timeout 0 --vhost-user-vsock "$D/$n.sock" -- \
        "$PWD/$V" bench serve vsock-listen:5000 >"$D/$n.guest.log" 2>&1 &
    PIDS+=($!); RUN+=($!)
    for _ in $(seq 600); do
        $V bench run "hvsock:$D/$n.vsock:5000" --latency --round-trips 1 --json >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "guest for $n never served" >&2; cat "$D/$n.log" "$D/$n.guest.log" >&2; exit 1
}

# The backend's user + system CPU time, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

stop() { for p in "${RUN[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }

# name: CONNS connections at once from one client (`bench run --conns`), 1M each way on each;
# prints all their bytes both ways over the time both phases took, in MiB/s (connecting excluded;
# before session 10 this started CONNS client processes and so timed their start-up too).
concurrent() {
    $V bench run "hvsock:$D/$1.vsock:5000" --conns "$CONNS" --bytes 1M --throughput --json |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print(round(2 / (1 / d["upload_mib_s"] + 1 / d["download_mib_s"]), 1))'
}

# NAMES="vmlink-vhost vdv" limits the run to some backends (vmlink-vhost-1m is another, and
# vmlink-vhost-base runs the binary VH_BASE names: a before/after comparison in the same run).
read -r -a NAMES <<<"${NAMES:-vmlink-vhost vdv vdv-256k}"
for r in $(seq "$ROUNDS"); do
    for n in "${NAMES[@]}"; do
        start "$n"
        qemu=$(pgrep -P "${RUN[1]}" | head -1)
        t0=$(cpu_ticks "${RUN[0]}"); g0=$(cpu_ticks "$qemu")
        out=$($V bench run "hvsock:$D/$n.vsock:5000" --bytes "$BYTES" --round-trips 2000 --json)
        t1=$(cpu_ticks "${RUN[0]}"); g1=$(cpu_ticks "$qemu")
        echo "$n $out" | tee -a "$D/results"
        echo "$n-cpu {\"cpu_s\": $(python3 -c "print(($t1 - $t0) / $(getconf CLK_TCK))"), \"guest_cpu_s\": $(python3 -c "print(($g1 - $g0) / $(getconf CLK_TCK))")}" | tee -a "$D/results"
        echo "$n-conc {\"conc_mib_s\": $(concurrent "$n")}" | tee -a "$D/results"
        stop
    done
done
python3 - "$D/results" "$BYTES" "$CONNS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, js = line.split(" ", 1)
    rows.setdefault(name, []).append(json.loads(js))
def med(name, *path):
    vals = []
    for r in rows[name]:
        for p in path:
            r = r[p]
        vals.append(r)
    return statistics.median(vals)
print()
print(f"vhost-user-vsock benchmark, {sys.argv[2]} each way, {sys.argv[3]} concurrent connections, median of {len(next(iter(rows.values())))} rounds")
print(f"{'backend':17} {'upload MiB/s':>13} {'download MiB/s':>15} {'rtt median us':>14} {'rtt p99 us':>11} {'concurrent MiB/s':>17} {'backend CPU s':>14} {'guest CPU s':>12}")
for n in [k for k in rows if not k.endswith("-conc") and not k.endswith("-cpu")]:
    print(f"{n:17} {med(n, 'upload_mib_s'):13.1f} {med(n, 'download_mib_s'):15.1f} "
          f"{med(n, 'latency_us', 'median'):14.1f} {med(n, 'latency_us', 'p99'):11.1f} {med(n + '-conc', 'conc_mib_s'):17.1f} {med(n + '-cpu', 'cpu_s'):14.2f} {med(n + '-cpu', 'guest_cpu_s'):12.2f}")
def paired(a, b, *path):
    # The ratio within each round (the backends ran one after the other), then its median:
    # machine noise that lasts a round hits both sides of a pair alike.
    def val(r):
        for p in path:
            r = r[p]
        return r
    return statistics.median(val(x) / val(y) for x, y in zip(rows[a], rows[b]))
v, d = "vmlink-vhost", "vdv"
for w in [k for k in rows if k.startswith(v) and "-c" not in k[len(v):]]:
  if d in rows:
    print(f"{w} / vdv, paired (median of the per-round ratios): upload {paired(w, d, 'upload_mib_s'):.2f}x, "
        f"download {paired(w, d, 'download_mib_s'):.2f}x, "
        f"rtt {paired(w, d, 'latency_us', 'median'):.2f}x, "
        f"concurrent {paired(w + '-conc', d + '-conc', 'conc_mib_s'):.2f}x, "
        f"backend CPU {paired(w + '-cpu', d + '-cpu', 'cpu_s'):.2f}x, "
        f"guest CPU {paired(w + '-cpu', d + '-cpu', 'guest_cpu_s'):.2f}x")
if v in rows and d in rows:
  print(f"ratios vmlink-vhost / vdv: upload {med(v, 'upload_mib_s') / med(d, 'upload_mib_s'):.2f}x, "
      f"download {med(v, 'download_mib_s') / med(d, 'download_mib_s'):.2f}x, "
      f"rtt {med(v, 'latency_us', 'median') / med(d, 'latency_us', 'median'):.2f}x, "
      f"concurrent {med(v + '-conc', 'conc_mib_s') / med(d + '-conc', 'conc_mib_s'):.2f}x, "
      f"backend CPU {med(v + '-cpu', 'cpu_s') / med(d + '-cpu', 'cpu_s'):.2f}x")
PY
