#!/usr/bin/env bash
# Benchmark (not a test): a one-node and a three-node cluster on the demo world, side by side on
# this machine. Loads the world once per cluster size (prints the ingest rate through n1), then runs
# the bench rounds interleaved (1 node, 3 nodes, 1 node, ...), since the machine's speed drifts.
# Each `recsys bench` prints latency percentiles, req/s, per-stage times and the CPU per request
# summed over every node (from /proc) with each node's resident memory.
#   ROUNDS=2 REQUESTS=3000 scripts/bench-cluster.sh
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
for round in $(seq "$ROUNDS"); do
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
