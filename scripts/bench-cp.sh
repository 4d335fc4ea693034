#!/usr/bin/env bash
# `vmlink cp` against the raw channel that carries it, `vmlink bench` on the same path, in the
# same run, alternating: the figure issue 4 asks for (cp at 80 % of the raw channel).
#
#   hvsock:  from the host into a `vmlink lab up --channel hvsock` guest: the host's vmlink
#            (native) talks hybrid vsock through vmlink-vhost to the guest (TCG), where
#            vmlink-agent (cp) or `vmlink bench serve` (raw) listens on vsock;
#   loopback: both ends inside one guest over vsock_loopback (client and agent both emulated).
#
#   scripts/bench-cp.sh [MIB] [ROUNDS]          defaults: 64 MiB, 3 rounds
#
# cp figures are `vmlink cp --json`'s (connect to end of copy, fsync and rename included, process
# start excluded, as `vmlink bench` excludes it); files on /dev/shm in the guest. Every copy back
# is compared byte for byte. The virtio-serial path is measured by `vmlink lab demo` (it needs
# a third, raw port). Needs release builds (built here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-64}
ROUNDS=${2:-3}
B=$PWD/target/release
V=${VMLINK:-$B/vmlink}  # VMLINK=path: A/B another build
[ -x "$V" ] && [ -x "$B/vmlink-agent" ] || cargo build --release -q -p vmlink -p vmlink-agent
D=$(mktemp -d /tmp/vmlink-bench-cp.XXXXXX)
NAME=benchcp-$$
cleanup() { "$V" lab down "$NAME" >/dev/null 2>&1 || true; rm -rf "$D"; }
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
