#!/usr/bin/env bash
# Benchmark (not a test): what TLS costs on one node, interleaved in one session. One node with
# the demo-shaped world, started in turn without TLS and with `[tls]` (a CA and a node certificate
# made here with the openssl CLI); each round runs `recsys bench` against each, which prints req/s,
# latency percentiles and the node's CPU per request (Admin.ClusterStatus, before and after).
# Prints the median of each over the rounds. The load generator shares the machine with the node.
# `recsys bench` keeps one HTTP/2 connection, so that is the per-request cost on a kept connection;
# a second phase opens HANDSHAKES new connections (one `recsys health` process each: a full
# handshake and one call) and reads the node's CPU time from /proc, for the cost per connection.
#   ROUNDS=5 REQUESTS=3000 CONCURRENCY=8 HANDSHAKES=300 scripts/bench-tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5} REQUESTS=${REQUESTS:-3000} CONCURRENCY=${CONCURRENCY:-8} HANDSHAKES=${HANDSHAKES:-300}
ITEMS=${ITEMS:-100000} USERS=${USERS:-10000} EVENTS=${EVENTS:-1000000}
command -v openssl >/dev/null || { echo "bench-tls: needs the openssl CLI to make test certificates" >&2; exit 1; }
SKIP_BUILD=${SKIP_BUILD:-0} scripts/setup.sh
BIN=target/release/recsys
PORT=${PORT:-7451}
WORK=data/bench-tls
mkdir -p "$WORK/pki"
PKI=$(cd "$WORK/pki" && pwd)
if [ ! -f "$PKI/node.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=recsys bench CA" -keyout "$PKI/ca-key.pem" -out "$PKI/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=recsys bench node" -keyout "$PKI/node-key.pem" -out "$PKI/node.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$PKI/ext.cnf"
  openssl x509 -req -in "$PKI/node.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca-key.pem" -CAcreateserial \
    -days 30 -extfile "$PKI/ext.cnf" -out "$PKI/node.pem" 2>/dev/null
fi
printf '[tls]\ncert = "%s/node.pem"\nkey = "%s/node-key.pem"\nca = "%s/ca.pem"\n' "$PKI" "$PKI" "$PKI" > "$WORK/tls.toml"
NODE=
stop() { if [ -n "$NODE" ]; then kill -TERM "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; NODE=; fi; }
trap stop EXIT
# start MODE: the node on one data dir (the same stored world for both modes), TLS on for "tls".
start() {
  local args=(--config config/node.toml)
  [ "$1" = tls ] && args+=(--config "$WORK/tls.toml")
  "$BIN" node "${args[@]}" --listen 127.0.0.1:$PORT --data-dir "$WORK/data" > "$WORK/node-$1.log" 2>&1 &
  NODE=$!
}
client() { if [ "$1" = tls ]; then echo "--tls-ca $PKI/ca.pem"; fi; }
if [ ! -f "$WORK/loaded" ]; then
  start plain
  echo "== load"
  $BIN load --addr 127.0.0.1:$PORT --items "$ITEMS" --users "$USERS" --events "$EVENTS" --quiet
  touch "$WORK/loaded"
  stop
fi
: > "$WORK/results.txt"
for round in $(seq "$ROUNDS"); do
  # Alternate which mode goes first, so drift in the machine's load falls on both.
  if [ $((round % 2)) = 1 ]; then modes="plain tls"; else modes="tls plain"; fi
  for mode in $modes; do
    start "$mode"
    # shellcheck disable=SC2046
    out=$($BIN bench --addr 127.0.0.1:$PORT $(client "$mode") --concurrency "$CONCURRENCY" --requests "$REQUESTS" --users "$USERS")
    stop
    echo "== round $round, $mode"; echo "$out"
    rps=$(echo "$out" | sed -n 's/.*→ \([0-9.]*\) req\/s.*/\1/p')
    p50=$(echo "$out" | sed -n 's/.*p50 \([0-9.]*\)  p90.*/\1/p')
    cpu=$(echo "$out" | sed -n 's/^node CPU per request: \([0-9.]*\) ms.*/\1/p')
    echo "$mode $rps $p50 $cpu" >> "$WORK/results.txt"
  done
done
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }
echo "== medians over $ROUNDS interleaved rounds (concurrency $CONCURRENCY, $REQUESTS requests each)"
for mode in plain tls; do
  rps=$(awk -v m=$mode '$1==m {print $2}' "$WORK/results.txt" | median)
  p50=$(awk -v m=$mode '$1==m {print $3}' "$WORK/results.txt" | median)
  cpu=$(awk -v m=$mode '$1==m {print $4}' "$WORK/results.txt" | median)
  echo "$mode: $rps req/s, p50 $p50 ms, node CPU per request $cpu ms"
done
# Cost per new connection: the node's CPU (utime + stime, /proc) over HANDSHAKES health checks, each
# from a new process on a new connection.
ticks() { awk '{print $14 + $15}' "/proc/$NODE/stat"; }
hz=$(getconf CLK_TCK)
: > "$WORK/connections.txt"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then modes="plain tls"; else modes="tls plain"; fi
  for mode in $modes; do
    start "$mode"
    # shellcheck disable=SC2046
    $BIN health --addr 127.0.0.1:$PORT $(client "$mode") --wait-secs 120 > /dev/null
    t0=$(ticks)
    for _ in $(seq "$HANDSHAKES"); do
      # shellcheck disable=SC2046
      $BIN health --addr 127.0.0.1:$PORT $(client "$mode") > /dev/null
    done
    t1=$(ticks)
    stop
    per=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$HANDSHAKES" 'BEGIN {printf "%.3f", 1000 * d / hz / n}')
    echo "== connections, round $round, $mode: node CPU per connection $per ms"
    echo "$mode $per" >> "$WORK/connections.txt"
  done
done
for mode in plain tls; do
  per=$(awk -v m=$mode '$1==m {print $2}' "$WORK/connections.txt" | median)
  echo "$mode: node CPU per new connection (handshake + one health call) $per ms (median of $ROUNDS)"
done
