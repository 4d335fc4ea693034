#!/usr/bin/env bash
# vmlink-agent's native protocol vs a stock qemu-ga, in one lab guest, same run, driven by the
# same vmlink CLI: the round trip of `vmlink exec TARGET -- true` (a whole CLI run: connect,
# handshake, exec, wait) and `vmlink cp` both ways.
#
#   A. inside the guest: vmlink-agent over vsock (vsock_loopback), vs qemu-ga and
#      vmlink-agent --qga over Unix sockets (qga+unix:): the protocols, on local transports;
#   B. from the host: qemu-ga on the guest's real org.qemu.guest_agent.0 virtio-serial port,
#      through QEMU's chardev socket (qga+unix:CHARDEV), as a host without vsock would use it.
#
#   scripts/bench-qga.sh [MIB] [N]        defaults: 16 MiB per copy, 20 exec round trips
#
# Needs a release build (cargo build --release -p vmlink -p vmlink-agent) and qemu-ga
# (Debian package qemu-guest-agent; it only ever runs inside the guest).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-16}
N=${2:-20}
B=$PWD/target/release
[ -x "$B/vmlink" ] && [ -x "$B/vmlink-agent" ] || cargo build --release -q -p vmlink -p vmlink-agent
D=$(mktemp -d /tmp/vmlink-bench-qga.XXXXXX)
LAB=
cleanup() { [ -z "$LAB" ] || kill "$LAB" 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT

# One measurement: ID TARGET DIR LABEL (DIR: a directory on the side TARGET points at).
# Prints one line per LABEL; the copy back is compared byte for byte.
# shellcheck disable=SC2016
BENCH='bench() {
  V=$B/vmlink; t=$(date +%s%N)
  for i in $(seq "$N"); do "$V" exec "$2" -- true; done
  e=$(( ($(date +%s%N) - t) / N / 1000 ))
  t=$(date +%s%N); "$V" cp -q "$SRC" "$2:$3/up-$1"; u=$(( $(date +%s%N) - t ))
  t=$(date +%s%N); "$V" cp -q "$2:$3/up-$1" "$LOCAL/down-$1"; d=$(( $(date +%s%N) - t ))
  cmp "$SRC" "$LOCAL/down-$1"
  awk -v n="$4" -v e="$e" -v u="$u" -v d="$d" -v m="$MIB" \
    "BEGIN { printf \"%-26s exec true %7.1f ms   cp up %7.2f MiB/s   down %7.2f MiB/s\\n\", n, e / 1000, m / (u / 1e9), m / (d / 1e9) }"
}'

GUEST="set -e
B=$B; N=$N; MIB=$MIB
$BENCH
mkdir -p /run/qga /run/qga2 /run/b
\$B/vmlink-agent --allow-cid 1 --listen vsock-listen:7878 --qga unix-listen:/run/vq.sock 2>/dev/null &
qemu-ga -m unix-listen -p /run/qga.sock -t /run/qga -f /run/qga/pid 2>/dev/null &
qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run/qga2 -f /run/qga2/pid 2>/dev/null &
# Readiness probes: each ping waits for its own answer.
until \$B/vmlink ping vsock:1:7878 >/dev/null 2>&1; do sleep 0.05; done
until \$B/vmlink ping qga+unix:/run/qga.sock >/dev/null 2>&1; do sleep 0.05; done
until \$B/vmlink ping qga+unix:/run/vq.sock >/dev/null 2>&1; do sleep 0.05; done
head -c \${MIB}M /dev/urandom > /run/b/src
SRC=/run/b/src; LOCAL=/run/b
bench an vsock:1:7878 /run/b 'A native vsock'
bench aq qga+unix:/run/qga.sock /run/b 'A qemu-ga unix'
bench av qga+unix:/run/vq.sock /run/b 'A vmlink --qga unix'
echo part-A-done
# Stay up for part B until the host connects to org.vmlink.done and closes it.
\$B/vmlink relay vport:org.vmlink.done stdio >/dev/null"

"$B/vmlink" lab run --vsock loopback --timeout 900s \
    --serial "org.qemu.guest_agent.0=$D/qga.sock" --serial "org.vmlink.done=$D/done.sock" \
    -- sh -c "$GUEST" >"$D/guest.out" 2>"$D/guest.err" &
LAB=$!
# The guest's output file is the event source: poll it for the end of part A.
until grep -q part-A-done "$D/guest.out" 2>/dev/null; do
    kill -0 "$LAB" 2>/dev/null || { cat "$D/guest.out" "$D/guest.err" >&2; exit 1; }
    sleep 0.2
done
grep '^A ' "$D/guest.out"

# Part B, from the host, while the guest idles.
export B N MIB
SRC=$D/src LOCAL=$D
head -c "${MIB}M" /dev/urandom >"$SRC"
eval "$BENCH"
bench bq "qga+unix:$D/qga.sock" /run/b 'B qemu-ga virtio-serial'

printf x | "$B/vmlink" relay stdio "unix:$D/done.sock" >/dev/null
wait "$LAB"
LAB=
