#!/usr/bin/env bash
# Instructions per GetCredential cache hit in the daemon, counted by callgrind.
#
# Instruction counts do not depend on how busy the machine is, so this is the number to
# compare two commits by when wall-clock numbers are too noisy. Method: the daemon (SQLite,
# one runtime worker, default settings otherwise) runs under `valgrind --tool=callgrind`
# twice, each life served by `credvault bench` (outside valgrind) with one caller reading
# 100 credentials (written before, by the daemon outside valgrind) in turn: N1 reads in
# the first life, N2 in the second. Both lives do the same start-up, first reads (the
# cache misses) and shutdown, so
#     (instructions of life 2 - instructions of life 1) / (N2 - N1)
# is what one more cache hit costs, everything the daemon does for it included (HTTP/2,
# the layers, the handler, the audit event and its share of the writer). The second life's
# profile is kept for `callgrind_annotate`, with the split by part printed at the end.
#
#   benches/callgrind.sh                 # N1=2000, N2=10000; builds the dist binary
#   BIN=path/to/credvault SKIP_BUILD=1 benches/callgrind.sh
#   N1=1000 N2=5000 REPEAT=3 benches/callgrind.sh
#   TARGET=raw benches/callgrind.sh      # the same count for a baseline server
#   BIN=old/credvault BENCH_BIN=new/credvault SKIP_BUILD=1 benches/callgrind.sh
#
# TARGET=raw|tonic counts the baseline servers of `credvault bench --serve-baseline` (one
# runtime worker, like the daemon here) the same way, so the daemon's instructions per
# hit can be stated as a multiple of what HTTP/2 alone (raw) or tonic alone costs.
# BENCH_BIN is the load generator (default: BIN), so an older daemon can be measured
# with the current client.
#
# Needs valgrind (Debian: apt-get install valgrind). Writes $OUT (default
# benches/results/callgrind): callgrind.out (life 2), annotate.txt and summary.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results/callgrind}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/dist/credvault}
N1=${N1:-2000}
N2=${N2:-10000}
REPEAT=${REPEAT:-1}
TARGET=${TARGET:-daemon}
KEYS=100
case "$TARGET" in
    daemon | raw | tonic) ;;
    *) echo "TARGET must be daemon, raw or tonic" >&2; exit 1 ;;
esac

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --profile dist --quiet
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
BENCH_BIN=${BENCH_BIN:-$BIN}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/credvault-callgrind.XXXXXX)
DAEMON_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for TEXT FILE DIR: until FILE shows TEXT (up to 2 minutes: valgrind starts
# slowly); exits if $DAEMON_PID dies first, with its stderr from DIR.
wait_for() {
    for _ in $(seq 1 1200); do
        grep -q "$1" "$2" 2>/dev/null && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$3/stderr" >&2; exit 1; }
        sleep 0.1
    done
    echo "the server did not start" >&2
    exit 1
}

# start DIR [wrapper...]: a daemon over DIR (run through the wrapper, if any); sets PORT
# and DAEMON_PID.
start() {
    local dir=$1 mport
    shift
    PORT=$(free_port)
    mport=$(free_port)
    "$@" "$BIN" serve --data-dir "$dir" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$mport" \
        --worker-threads 1 >>"$dir/stdout" 2>"$dir/stderr" &
    DAEMON_PID=$!
    wait_for 'serving gRPC' "$dir/stderr" "$dir"
}

# start_baseline DIR [wrapper...]: a baseline server of kind $TARGET; sets PORT and DAEMON_PID.
start_baseline() {
    local dir=$1
    shift
    PORT=$(free_port)
    "$@" "$BIN" bench --serve-baseline "$TARGET" --listen "127.0.0.1:$PORT" --baseline-workers 1 \
        --value-size 256 >>"$dir/stdout" 2>"$dir/stderr" &
    DAEMON_PID=$!
    wait_for 'listening on' "$dir/stdout" "$dir"
}

stop() {
    kill -TERM "$DAEMON_PID"
    wait "$DAEMON_PID" || true
    DAEMON_PID=
}

# life N OUTFILE: one daemon life under callgrind serving N reads; prints its instructions.
# The credentials are written beforehand by a daemon outside valgrind (under valgrind the
# bench's 32 concurrent seeding writes can outwait the store pool), so each life starts
# over the same data and only reads.
life() {
    local n=$1 outfile=$2 dir token
    dir=$(mktemp -d "$WORK/life.XXXXXX")
    if [ "$TARGET" = daemon ]; then
        start "$dir"
        token=$(sed -n 's/^export CREDVAULT_TOKEN=//p' "$dir/stdout")
        "$BENCH_BIN" bench --addr "http://127.0.0.1:$PORT" --token "$token" --workload get --keys "$KEYS" \
            --value-size 256 --requests "$KEYS" --warmup 0 >/dev/null
        stop
        start "$dir" valgrind --tool=callgrind --callgrind-out-file="$outfile"
    else
        token=unused
        start_baseline "$dir" valgrind --tool=callgrind --callgrind-out-file="$outfile"
    fi
    "$BENCH_BIN" bench --addr "http://127.0.0.1:$PORT" --token "$token" --workload get --keys "$KEYS" --no-seed \
        --value-size 256 --distribution sequential --requests "$n" --warmup 0 -c 1 --connections 1 \
        --request-timeout 60 --json >"$dir/bench.json"
    python3 - "$dir/bench.json" "$n" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["credvault"]
if r["ok"] != int(sys.argv[2]):
    sys.exit(f"expected {sys.argv[2]} OK reads, got {r['outcomes']}")
EOF
    stop
    # "summary: N" (or "totals: N") is the whole program's instruction count.
    sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$outfile" | head -1
}

: >"$OUT/summary.txt"
for r in $(seq 1 "$REPEAT"); do
    a=$(life "$N1" "$WORK/life1.out")
    b=$(life "$N2" "$OUT/callgrind.out")
    per=$(( (b - a) / (N2 - N1) ))
    echo "round $r: $a instructions for $N1 reads, $b for $N2: $per instructions per cache hit" | tee -a "$OUT/summary.txt"
done

callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | head -80 >"$OUT/annotate.txt" || true
echo "profile of the $N2-read life: $OUT/callgrind.out (top functions, inclusive: $OUT/annotate.txt)"
