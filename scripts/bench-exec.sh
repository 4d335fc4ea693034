#!/usr/bin/env bash
# A/B of the agent's exec path on the host (native, over a Unix socket on /dev/shm): two builds,
# alternating, the same rounds each: `vmlink exec -- true` and `vmlink ping` (whole CLI runs,
# process start included), 1 GiB of stdout, 256 MiB of stdin. Compare as ratios per round:
# this host is noisy.
#
#   scripts/bench-exec.sh OLD_BINDIR NEW_BINDIR [ROUNDS]     default 5 rounds
#
# A BINDIR holds vmlink and vmlink-agent (e.g. target/release, or a build of an older commit:
# `git worktree add /tmp/old REV && CARGO_TARGET_DIR=/tmp/oldtarget cargo build --release
# -p vmlink -p vmlink-agent` in it).
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-5}

one() {
    local b=$1 tag=$2 s=/dev/shm/vmlink-bench-exec-$$.sock
    rm -f "$s"
    "$b/vmlink-agent" --listen "unix-listen:$s" 2>/dev/null &
    local agent=$!
    # The agent prints its "listening on" line once bound; here the socket file is the event.
    while [ ! -S "$s" ]; do sleep 0.01; done
    "$b/vmlink" exec "unix:$s" -- true
    local t0 t1 t2 t3 t4
    t0=$(date +%s%N)
    for _ in $(seq 100); do "$b/vmlink" exec "unix:$s" -- true; done
    t1=$(date +%s%N)
    for _ in $(seq 100); do "$b/vmlink" ping "unix:$s" >/dev/null; done
    t2=$(date +%s%N)
    "$b/vmlink" exec "unix:$s" -- head -c 1073741824 /dev/zero >/dev/null
    t3=$(date +%s%N)
    head -c 268435456 /dev/zero | "$b/vmlink" exec -i "unix:$s" -- wc -c >/dev/null
    t4=$(date +%s%N)
    kill "$agent"
    wait "$agent" 2>/dev/null || true
    rm -f "$s"
    awk -v tag="$tag" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" 'BEGIN {
        printf "%s: exec true %.2f ms, ping %.2f ms, 1 GiB stdout %.0f MiB/s, 256 MiB stdin %.0f MiB/s\n",
            tag, (b - a) / 1e8, (c - b) / 1e8, 1024 / ((d - c) / 1e9), 256 / ((e - d) / 1e9) }'
}

for r in $(seq "$ROUNDS"); do
    one "$OLD" "old round $r"
    one "$NEW" "new round $r"
done
