#!/usr/bin/env bash
# Benchmark (not a test): a one-node and a three-node cluster on the demo world, side by side on
# this machine. Loads the world once per cluster size (prints the ingest rate through n1), then runs
# the bench rounds interleaved (1 node, 3 nodes, 1 node, ...), since the machine's speed drifts.
# Each `recsys bench` prints latency percentiles, req/s, per-stage times and the CPU per request
# summed over every node (from /proc) with each node's resident memory.
#   ROUNDS=2 REQUESTS=3000 scripts/bench-cluster.sh
#   OLD_BIN=/path/to/older/recsys OLD_CONFIG=old-node.toml scripts/bench-cluster.sh
#     adds a one-node run of an older build (e.g. a `git worktree` of the commit before the cluster,
#     with `git show COMMIT:config/node.toml > old-node.toml`: config keys changed since)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2} REQUESTS=${REQUESTS:-3000}
ITEMS=${ITEMS:-100000} USERS=${USERS:-10000} EVENTS=${EVENTS:-1000000}
SIZES=${SIZES:-"1 3"}
SKIP_BUILD=${SKIP_BUILD:-0} scripts/setup.sh
BIN=target/release/recsys
export RECSYS_BIN=$BIN
for n in $SIZES; do
  export RECSYS_CLUSTER_DIR=data/bench-$n
  if [ ! -f "$RECSYS_CLUSTER_DIR/loaded" ]; then
    rm -rf "$RECSYS_CLUSTER_DIR"
    cluster/local.sh up "$n" > /dev/null
    echo "== $n node(s): load through n1"
    $BIN load --addr 127.0.0.1:7401 --items "$ITEMS" --users "$USERS" --events "$EVENTS" --quiet
    cluster/local.sh down > /dev/null
    touch "$RECSYS_CLUSTER_DIR/loaded"
  fi
done
cpu_ticks() { local t=0; for p in $(pgrep -f "recsys node|recsys-old node" || true); do
  t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
if [ -n "${OLD_BIN:-}" ]; then
  OLD_DIR=data/bench-old
  if [ ! -f "$OLD_DIR/loaded" ]; then
    rm -rf "$OLD_DIR"; mkdir -p "$OLD_DIR"
    "$OLD_BIN" node --config "$OLD_CONFIG" --listen 127.0.0.1:7431 --data-dir "$OLD_DIR" > "$OLD_DIR/node.log" 2>&1 &
    OLD=$!
    echo "== older build, one node: load"
    $BIN load --addr 127.0.0.1:7431 --items "$ITEMS" --users "$USERS" --events "$EVENTS" --quiet
    kill -TERM $OLD; wait $OLD || true
    touch "$OLD_DIR/loaded"
  fi
fi
for round in $(seq "$ROUNDS"); do
  if [ -n "${OLD_BIN:-}" ]; then
    "$OLD_BIN" node --config "$OLD_CONFIG" --listen 127.0.0.1:7431 --data-dir "$OLD_DIR" > "$OLD_DIR/node.log" 2>&1 &
    OLD=$!
    for c in 4 16; do
      echo "== round $round, older build (one node), concurrency $c"
      t0=$(cpu_ticks)
      out=$($BIN bench --addr 127.0.0.1:7431 --concurrency $c --requests "$REQUESTS" --users "$USERS")
      t1=$(cpu_ticks)
      echo "$out"
      ok=$(echo "$out" | sed -n 's/.*: \([0-9]*\) ok.*/\1/p' | head -1)
      awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$ok" \
        'BEGIN { printf "node CPU per request (from /proc, incl. the 50 warm-up requests): %.2f ms\n", d * 1000 / hz / (n + 50) }'
    done
    kill -TERM $OLD; wait $OLD || true
  fi
  for n in $SIZES; do
    export RECSYS_CLUSTER_DIR=data/bench-$n
    cluster/local.sh up "$n" > /dev/null
    for c in 4 16; do
      echo "== round $round, $n node(s), concurrency $c (asking n$n)"
      $BIN bench --addr "127.0.0.1:$((7400 + n))" --concurrency $c --requests "$REQUESTS" --users "$USERS"
    done
    cluster/local.sh down > /dev/null
  done
done
