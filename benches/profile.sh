#!/usr/bin/env bash
# A CPU profile of the daemon under cache-hit load: `perf record` on the daemon alone
# (SQLite, default settings) for $SECONDS_PROFILED s while `credvault bench` runs 64
# callers over 4 connections against it, then the split by thread, by library and by
# function.
#
#   benches/profile.sh                   # builds the dist binary
#   BIN=path/to/credvault SKIP_BUILD=1 CALLERS=1 CONNECTIONS=1 benches/profile.sh
#   CALL_GRAPH=dwarf benches/profile.sh  # callers of malloc, locks (larger perf.data)
#
# Needs perf (Debian: linux-perf). Writes $OUT (default benches/results/profile):
# perf.data, by-thread.txt, by-dso.txt, by-symbol.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results/profile}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/dist/credvault}
CALLERS=${CALLERS:-64}
CONNECTIONS=${CONNECTIONS:-4}
SECONDS_PROFILED=${SECONDS_PROFILED:-4}
# Frame pointers (perf's default, cheap but blind inside most Rust frames) or, with
# CALL_GRAPH=dwarf, unwound stacks: who calls malloc, which lock is contended.
CALL_GRAPH=${CALL_GRAPH:-fp}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --profile dist --quiet
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/credvault-profile.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
PORT=$(free_port)
MPORT=$(free_port)
"$BIN" serve --data-dir "$WORK" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$MPORT" \
    >"$WORK/stdout" 2>"$WORK/stderr" &
DAEMON=$!
PIDS+=("$DAEMON")
for _ in $(seq 1 300); do
    grep -q 'serving gRPC' "$WORK/stderr" 2>/dev/null && break
    sleep 0.1
done
TOKEN=$(sed -n 's/^export CREDVAULT_TOKEN=//p' "$WORK/stdout")
# Seed and warm, then load for longer than the profile lasts.
"$BIN" bench --addr "http://127.0.0.1:$PORT" --token "$TOKEN" --keys 1000 --value-size 256 \
    -c "$CALLERS" --connections "$CONNECTIONS" --warmup 1 --duration 1 >/dev/null
"$BIN" bench --addr "http://127.0.0.1:$PORT" --token "$TOKEN" --keys 1000 --value-size 256 --no-seed \
    -c "$CALLERS" --connections "$CONNECTIONS" --warmup 1 --duration $((SECONDS_PROFILED + 3)) >"$OUT/bench.txt" &
LOAD=$!
PIDS+=("$LOAD")
sleep 2
perf record -F 999 --call-graph "$CALL_GRAPH" -p "$DAEMON" -o "$OUT/perf.data" -- sleep "$SECONDS_PROFILED" 2>"$WORK/perf.err"
wait "$LOAD" || true
# `head` closing its pipe early makes perf exit on SIGPIPE: not a failure here.
perf report -i "$OUT/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | head -20 >"$OUT/by-thread.txt" || true
perf report -i "$OUT/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | head -20 >"$OUT/by-dso.txt" || true
perf report -i "$OUT/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' \
    | grep -v '^$' | head -60 >"$OUT/by-symbol.txt" || true
cat "$OUT/bench.txt" "$OUT/by-thread.txt" "$OUT/by-dso.txt"
head -40 "$OUT/by-symbol.txt"
