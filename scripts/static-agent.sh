#!/usr/bin/env bash
# Builds the statically linked vmlink-agent (glibc, +crt-static: for guests
# whose libc is older or absent) and checks it: `file` must call it
# statically linked (no dynamic interpreter), and in a lab guest it must
# serve every verb over vsock: ping, exec (--user, -t), cp both ways, run and
# logs.
#
#   bash scripts/static-agent.sh            # build, then check on the host and in a guest
#   scripts/static-agent.sh --guest AGENT VMLINK   (what runs inside the guest)
#
# The build goes to target/static so the normal build is not invalidated.
# Needs a built target/debug/vmlink (cargo build --workspace).
set -euo pipefail

if [ "${1:-}" = --guest ]; then
    agent=$2 vmlink=$3
    port=7979
    err=/run/static-agent.err
    rm -f "$err"
    mkfifo "$err"
    "$agent" --listen "vsock-listen:any:$port" --allow-cid local 2>"$err" &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    exec 3<"$err"
    # Wait for the agent's "listening on" line (an event, not a sleep), then
    # keep draining its stderr so it never blocks.
    IFS= read -r line <&3
    case $line in
        "vmlink-agent: listening on "*) ;;
        *) echo "static agent: unexpected first line: $line" >&2; exit 1 ;;
    esac
    cat <&3 >&2 &
    "$vmlink" ping "vsock:local:$port"
    out=$("$vmlink" exec "vsock:local:$port" -- sh -c 'echo static-agent-ok; exit 3') && rc=0 || rc=$?
    [ "$out" = static-agent-ok ] || { echo "static agent exec printed: $out" >&2; exit 1; }
    [ "$rc" = 3 ] || { echo "static agent exec exited $rc, expected 3" >&2; exit 1; }
    # --user reads /etc/passwd itself (no NSS in a static binary); -t allocates a pty.
    who=$("$vmlink" exec --user nobody "vsock:local:$port" -- id -un)
    [ "$who" = nobody ] || { echo "static agent --user nobody ran as: $who" >&2; exit 1; }
    size=$("$vmlink" exec -t --tty-size 33x77 "vsock:local:$port" -- stty size | tr -d '\r')
    [ "$size" = "33 77" ] || { echo "static agent -t: stty size said: $size" >&2; exit 1; }
    # cp both ways (checksummed end to end, compared here too), run, logs.
    t="vsock:local:$port"
    head -c 5000000 /dev/urandom > /run/static-src
    "$vmlink" cp -q /run/static-src "$t:/run/static-dst"
    "$vmlink" cp -q "$t:/run/static-dst" /run/static-back
    cmp /run/static-src /run/static-back || { echo "static agent: cp both ways changed the file" >&2; exit 1; }
    printf '#!/bin/sh\necho "run: $1"\n' > /run/static-script
    ran=$("$vmlink" run "$t" /run/static-script arg)
    [ "$ran" = "run: arg" ] || { echo "static agent run printed: $ran" >&2; exit 1; }
    printf 'one\ntwo\nthree\n' > /run/static-log
    tail=$("$vmlink" logs -n 2 "$t" /run/static-log | tr '\n' ' ')
    [ "$tail" = "two three " ] || { echo "static agent logs -n 2 printed: $tail" >&2; exit 1; }
    echo "static agent: ping, exec, --user, -t, cp both ways, run and logs OK in the guest"
    exit 0
fi

cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
agent=target/static/$target/release/vmlink-agent
echo "== static vmlink-agent (+crt-static, target/static)"
# Without debug info: it halves the build (this is a check, not a release).
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo build --release --locked --target "$target" -p vmlink-agent --target-dir target/static
desc=$(file -L "$agent")
echo "$desc"
case $desc in
    *"statically linked"*|*"static-pie linked"*) ;;
    *) echo "static-agent: $agent is not statically linked" >&2; exit 1 ;;
esac
if readelf -l "$agent" | grep -q INTERP; then
    echo "static-agent: $agent has a dynamic interpreter (PT_INTERP)" >&2
    exit 1
fi
ls -l "$agent"
target/debug/vmlink lab run --vsock loopback --timeout 120s -- \
    bash scripts/static-agent.sh --guest "$PWD/$agent" "$PWD/target/debug/vmlink"
