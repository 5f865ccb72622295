#!/bin/bash
# Push measurements against real daemon processes (BENCHMARKS.md, "Caching client"):
# staleness with one daemon (SQLite, then PostgreSQL) and with two daemons over one
# PostgreSQL database, and the fan-out to 1,000 watch streams with the daemon's memory per
# watcher. Needs PostgreSQL at 127.0.0.1:5432 (user postgres, trust) and ports 19200-19212.
#
#   cargo build --profile dist --bin credvault && BIN=target/dist/credvault benches/client_push.sh
set -u
BIN=$(realpath "${BIN:-target/dist/credvault}")
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"
mkdir -p d1 d2 sq
cat > limits.toml <<'T'
[limits]
max_concurrent_requests = 4096
[transport]
max_concurrent_requests_per_token = 4096
max_watch_streams = 2048
max_watch_streams_per_token = 2048
T
PG=postgres://postgres@127.0.0.1:5432
DB=credvault_client2_bench
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" >/dev/null
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $DB" >/dev/null
start() { # name listen metrics datadir dburl [extra args]
  $BIN serve --config limits.toml --listen 127.0.0.1:$2 --metrics-listen 127.0.0.1:$3 --data-dir $4 --database-url "$5" "${@:6}" > $1.out 2> $1.log &
  echo $!
}
wait_up() { for i in $(seq 1 100); do grep -q "serving gRPC" $1.log 2>/dev/null && return 0; sleep 0.2; done; echo "$1 did not start"; cat $1.log; exit 1; }
# One daemon over SQLite: fan-out and staleness.
P0=$(start sq 19200 19210 $W/sq "sqlite://$W/sq/cv.db"); wait_up sq
export CREDVAULT_TOKEN=$(grep -o 'export CREDVAULT_TOKEN=.*' sq.out | cut -d= -f2)
echo "== sqlite daemon pid $P0"
$BIN bench --addr http://127.0.0.1:19200 --watch staleness --puts 1000 --prefix stale/ --json > staleness-sqlite.json; cat staleness-sqlite.json
$BIN bench --addr http://127.0.0.1:19200 --watch fanout --watchers 1000 --watch-connections 20 --puts 200 --prefix fan/ --server-pid $P0 --json > fanout-sqlite.json; cat fanout-sqlite.json
kill $P0; wait $P0 2>/dev/null
# Two daemons over PostgreSQL.
P1=$(start d1 19201 19211 $W/d1 "$PG/$DB"); wait_up d1
export CREDVAULT_TOKEN=$(grep -o 'export CREDVAULT_TOKEN=.*' d1.out | cut -d= -f2)
P2=$(start d2 19202 19212 $W/d2 "$PG/$DB" --master-key-file $W/d1/master.key); wait_up d2
echo "== postgres daemons pids $P1 $P2"
$BIN bench --addr http://127.0.0.1:19201 --watch staleness --puts 1000 --prefix stale/ --json > staleness-pg-one.json; cat staleness-pg-one.json
$BIN bench --addr http://127.0.0.1:19201 --writer-addr http://127.0.0.1:19202 --watch staleness --puts 1000 --prefix stale2/ --json > staleness-pg-two.json; cat staleness-pg-two.json
$BIN bench --addr http://127.0.0.1:19201 --watch fanout --watchers 1000 --watch-connections 20 --puts 200 --prefix fan/ --server-pid $P1 --json > fanout-pg.json; cat fanout-pg.json
kill $P1 $P2; wait 2>/dev/null
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" >/dev/null
