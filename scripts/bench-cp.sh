#!/usr/bin/env bash
# `vmlink cp` against the raw channel that carries it, `vmlink bench` on the same path, in the
# same run, alternating: the figure issue 4 asks for (cp at 80 % of the raw channel).
#
#   hvsock:  from the host into a `vmlink lab up --channel hvsock` guest: the host's vmlink
#            (native) talks hybrid vsock through vmlink-vhost to the guest (TCG), where
#            vmlink-agent (cp) or `vmlink bench serve` (raw) listens on vsock;
#   loopback: both ends inside one guest over vsock_loopback (client and agent both emulated);
#   serial:  from the host over virtio-serial: the host's vmlink talks through `vmlink
#            serial-bridge` to the agent on org.vmlink.ctl + org.vmlink.data (the serial mux,
#            docs/serial-mux.md); the raw channel is a third port, org.vmlink.bench, in the same
#            guest. Each serial line also gives the host CPU seconds each part used (QEMU's main
#            thread, its other threads: the vCPUs; the bridge; the client) and how busy the
#            guest's vCPUs were: on a host with few cores, their sum bounds the copy.
#
#   scripts/bench-cp.sh [MIB] [ROUNDS] [PATHS]  defaults: 64 MiB, 3 rounds, "hvsock loopback serial"
#
# cp figures are `vmlink cp --json`'s (connect to end of copy, fsync and rename included, process
# start excluded, as `vmlink bench` excludes it); files on /dev/shm in the guest. Every copy back
# is compared byte for byte. Needs release builds (built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-64}
ROUNDS=${2:-3}
PATHS=${3:-hvsock loopback serial}
B=$PWD/target/release
V=${VMLINK:-$B/vmlink}  # VMLINK=path: A/B another build
[ -x "$V" ] && [ -x "$B/vmlink-agent" ] || cargo build --release -q -p vmlink -p vmlink-agent
D=$(mktemp -d /tmp/vmlink-bench-cp.XXXXXX)
NAME=benchcp-$$
LAB=
cleanup() {
    "$V" lab down "$NAME" >/dev/null 2>&1 || true
    [ -z "$LAB" ] || { kill "$LAB" 2>/dev/null; wait "$LAB" 2>/dev/null; } || true
    rm -rf "$D"
}
trap cleanup EXIT
head -c "${MIB}M" /dev/urandom >"$D/src"

# ratio LABEL RAW_JSON PUT_JSON GET_JSON: one line of figures.
ratio() {
    python3 - "$@" <<'PY'
import json, sys
label, r, p, g = sys.argv[1], *(json.loads(a) for a in sys.argv[2:])
up, down = r["upload_mib_s"], r["download_mib_s"]
print("%-9s raw up %6.1f down %6.1f MiB/s | cp put %6.1f (%3.0f %%)  get %6.1f (%3.0f %%)  [%s]"
      % (label, up, down, p["mib_s"], 100 * p["mib_s"] / up, g["mib_s"], 100 * g["mib_s"] / down,
         p["checksum"]))
PY
}

want() { [[ " $PATHS " == *" $1 "* ]]; }

if want hvsock; then
echo "== hvsock: host -> guest through vmlink-vhost, $MIB MiB, $ROUNDS rounds"
"$V" lab up "$NAME" --channel hvsock --agent "$B/vmlink-agent" >/dev/null
TARGET=$("$V" lab ls --json | python3 -c '
import json, sys
for l in sys.stdin:
    v = json.loads(l)
    if v["name"] == sys.argv[1]: print(v["target"])' "$NAME")
UDS=${TARGET#hvsock:}
UDS=${UDS%:*}
"$V" exec "lab:$NAME" -- sh -c "setsid -f $V bench serve vsock-listen:5000 >/dev/null 2>&1"
for _ in $(seq 100); do
    "$V" bench run "hvsock:$UDS:5000" --latency --round-trips 1 --json >/dev/null 2>&1 && break
    sleep 0.2
done
for r in $(seq "$ROUNDS"); do
    raw=$("$V" bench run "hvsock:$UDS:5000" --bytes "${MIB}M" --round-trips 10 --json)
    put=$("$V" cp -q --json "$D/src" "lab:$NAME:/dev/shm/cp.bin")
    get=$("$V" cp -q --json "lab:$NAME:/dev/shm/cp.bin" "$D/back")
    cmp "$D/src" "$D/back"
    rm -f "$D/back"
    ratio "round $r" "$raw" "$put" "$get"
done
"$V" lab down "$NAME" >/dev/null
fi

if want loopback; then
echo "== loopback: client and agent both in one guest (vsock_loopback), $MIB MiB, $ROUNDS rounds"
cat >"$D/guest.sh" <<EOF
set -e
$B/vmlink-agent --listen vsock-listen:7878 --allow-cid local 2>/dev/null &
$V bench serve vsock-listen:5000 2>/dev/null &
mkdir -p /dev/shm/up
head -c ${MIB}M /dev/urandom > /dev/shm/src
for _ in \$(seq 100); do $V ping vsock:local:7878 >/dev/null 2>&1 && break; sleep 0.2; done
for r in \$(seq $ROUNDS); do
  raw=\$($V bench run vsock:local:5000 --bytes ${MIB}M --round-trips 10 --json)
  put=\$($V cp -q --json /dev/shm/src vsock:local:7878:/dev/shm/up/)
  get=\$($V cp -q --json vsock:local:7878:/dev/shm/up/src /dev/shm/back)
  cmp /dev/shm/src /dev/shm/back
  rm -f /dev/shm/back /dev/shm/up/src
  echo "\$raw" > /dev/shm/raw.\$r; echo "\$put" > /dev/shm/put.\$r; echo "\$get" > /dev/shm/get.\$r
  cat /dev/shm/raw.\$r /dev/shm/put.\$r /dev/shm/get.\$r
done
EOF
"$V" lab run --vsock loopback --mem 1G -- bash "$D/guest.sh" >"$D/loop.out"
mapfile -t L <"$D/loop.out"
for ((i = 0; i + 2 < ${#L[@]}; i += 3)); do
    ratio "round $((i / 3 + 1))" "${L[i]}" "${L[i + 1]}" "${L[i + 2]}"
done
fi

if want serial; then
echo "== serial: host -> guest over virtio-serial (serial mux through vmlink serial-bridge), $MIB MiB, $ROUNDS rounds"
# The guest serves one raw port and runs the agent until the host kills it.
"$V" lab run --mem 1G --timeout 0 \
    --serial "org.vmlink.ctl=$D/ctl.sock" --serial "org.vmlink.data=$D/data.sock" \
    --serial "org.vmlink.bench=$D/bench.sock" \
    -- sh -c "$V bench serve vport:org.vmlink.bench 2>/dev/null & exec $B/vmlink-agent" \
    >"$D/serial-guest.log" 2>&1 &
LAB=$!
for _ in $(seq 300); do [ -S "$D/data.sock" ] && [ -S "$D/bench.sock" ] && break; sleep 0.2; done
"$V" serial-bridge "$D/ctl.sock" "$D/data.sock" --listen "$D/agent.sock" 2>"$D/bridge.log" &
BRIDGE=$!
AGENT="unix:$D/agent.sock"
for _ in $(seq 300); do "$V" ping -c 1 "$AGENT" >/dev/null 2>&1 && break; sleep 0.2; done
QEMU=$(pgrep -f "qemu-system.*$D/ctl.sock" | head -1)
HZ=$(getconf CLK_TCK)
# cpu PID main|other|all: CPU ticks (user + system) of the process's threads.
cpu() {
    local sum=0 t tid st f
    for t in /proc/"$1"/task/*; do
        tid=${t##*/}
        case $2 in main) [ "$tid" = "$1" ] || continue ;; other) [ "$tid" != "$1" ] || continue ;; esac
        read -r st <"$t/stat" || continue
        read -ra f <<<"${st##*) }"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}
# snap: QEMU main, QEMU other threads, bridge (ticks); guest busy, idle (ticks of all vCPUs).
snap() {
    echo "$(cpu "$QEMU" main) $(cpu "$QEMU" other) $(cpu "$BRIDGE" all)" \
        "$("$V" exec "$AGENT" -- head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8, $5+$6}')"
}
# timed OUT CMD...: run CMD with its output in OUT; print the CPU split as JSON.
timed() {
    local out=$1 a b
    shift
    a=$(snap)
    python3 -c '
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out:
    subprocess.run(sys.argv[3:], stdout=out, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[2], "w").write("%f %f" % (r.ru_utime, r.ru_stime))' "$out" "$D/client.cpu" "$@"
    b=$(snap)
    python3 - "$a" "$b" "$(cat "$D/client.cpu")" "$HZ" <<'PY'
import json, sys
a, b = (list(map(int, x.split())) for x in sys.argv[1:3])
hz = float(sys.argv[4])
d = [(y - x) / hz for x, y in zip(a, b)]
print(json.dumps({"qemu_main": d[0], "qemu_other": d[1], "bridge": d[2],
                  "client": sum(map(float, sys.argv[3].split())),
                  "guest_busy": d[3] * hz / 100, "guest_idle": d[4] * hz / 100}))
PY
}
split() {
    python3 - "$@" <<'PY'
import json, sys
label, c = sys.argv[1], json.loads(sys.argv[2])
host = c["qemu_main"] + c["qemu_other"] + c["bridge"] + c["client"]
print("  %-11s host CPU s: QEMU main %.2f, vCPUs and other %.2f, bridge %.2f, client %.2f = %.2f;"
      " guest vCPUs busy %.2f s, idle %.2f s"
      % (label, c["qemu_main"], c["qemu_other"], c["bridge"], c["client"], host,
         c["guest_busy"], c["guest_idle"]))
PY
}
for r in $(seq "$ROUNDS"); do
    "$V" exec "$AGENT" -- rm -f /dev/shm/cp.bin
    craw=$(timed "$D/raw.json" "$V" bench run "unix:$D/bench.sock" --bytes "${MIB}M" --round-trips 10 --json)
    cput=$(timed "$D/put.json" "$V" cp -q --json "$D/src" "$AGENT:/dev/shm/cp.bin")
    cget=$(timed "$D/get.json" "$V" cp -q --json "$AGENT:/dev/shm/cp.bin" "$D/back")
    cmp "$D/src" "$D/back"
    rm -f "$D/back"
    ratio "round $r" "$(cat "$D/raw.json")" "$(cat "$D/put.json")" "$(cat "$D/get.json")"
    split "raw up+down" "$craw"
    split "put" "$cput"
    split "get" "$cget"
done
kill "$BRIDGE" 2>/dev/null || true
fi
