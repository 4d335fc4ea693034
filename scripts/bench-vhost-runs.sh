#!/usr/bin/env bash
# scripts/bench-vhost-paired.sh RUNS times, each with freshly booted guests, and the median of the
# runs' own medians. Why: an A/A run (the same vmlink-vhost binary as both backends) differed
# by ~10 % between its two guests for a whole run on this host (docs/benchmarks.md, session 10),
# so one run's guest placement can carry a ratio across a goal; fresh boots re-draw it.
#
#   scripts/bench-vhost-runs.sh VDV [BYTES] [ROUNDS] [RUNS]      defaults: 256M 6 5
set -euo pipefail
cd "$(dirname "$0")/.."
VDV=${1:?usage: scripts/bench-vhost-runs.sh PATH-TO-vhost-device-vsock [BYTES] [ROUNDS] [RUNS]}
BYTES=${2:-256M}
ROUNDS=${3:-6}
RUNS=${4:-5}
OUT=$(mktemp /tmp/vmlink-vhost-runs.XXXXXX)
trap 'rm -f "$OUT"' EXIT
for r in $(seq "$RUNS"); do
    line=$(scripts/bench-vhost-paired.sh "$VDV" "$BYTES" "$ROUNDS" | grep '^vmlink-vhost / vdv')
    echo "run $r: ${line#*: }"
    echo "$line" >>"$OUT"
done
python3 - "$OUT" <<'PY'
import re, statistics, sys
runs = [dict((k, float(v)) for k, v in re.findall(r"(rtt|upload|download) ([0-9.]+)x", l))
        for l in open(sys.argv[1])]
goal = {"rtt": lambda x: x <= 0.8, "upload": lambda x: x >= 1.5, "download": lambda x: x >= 1.5}
print(f"vmlink-vhost / vdv over {len(runs)} runs (median of the runs' medians of per-round ratios):")
for k in ("rtt", "upload", "download"):
    v = [r[k] for r in runs]
    print(f"  {k:9} {statistics.median(v):.2f}x  (runs {min(v):.2f}-{max(v):.2f}x; "
          f"goal {'<= 0.8' if k == 'rtt' else '>= 1.5'}x met in {sum(map(goal[k], v))} of {len(v)})")
PY
