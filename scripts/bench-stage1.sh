#!/usr/bin/env bash
# Benchmark (not a test): the stage-1 engines on one node with the demo world, interleaved in one
# session: this build with `scoring.stage1_engine = "native"`, this build with "ort", and (with
# OLD_BIN) an older build, which has only ONNX Runtime. Each round runs `recsys bench` at
# concurrency 4 and 16; `recsys bench` prints latency percentiles, req/s, per-stage times and the
# node's CPU per request (from Admin.ClusterStatus).
#   ROUNDS=2 REQUESTS=3000 scripts/bench-stage1.sh
#   OLD_BIN=/path/to/older/recsys OLD_CONFIG=old-node.toml scripts/bench-stage1.sh
#     (an older build reads the same models only if its manifest parser accepts this manifest:
#      point OLD_CONFIG's scoring.models_dir at a copy without the newer keys)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2} REQUESTS=${REQUESTS:-3000}
ITEMS=${ITEMS:-100000} USERS=${USERS:-10000} EVENTS=${EVENTS:-1000000}
SKIP_BUILD=${SKIP_BUILD:-0} scripts/setup.sh
BIN=target/release/recsys
PORT=7441
WORK=data/bench-stage1
mkdir -p "$WORK"
printf '[scoring]\nstage1_engine = "ort"\n' > "$WORK/ort.toml"
NODE=
stop() { if [ -n "$NODE" ]; then kill -TERM "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; NODE=; fi; }
trap stop EXIT
# start NAME BINARY CONFIG...: a node on its own data dir, loaded with the world on first use.
start() {
  local name=$1 bin=$2; shift 2
  local dir=$WORK/$name args=()
  for c in "$@"; do args+=(--config "$c"); done
  mkdir -p "$dir"
  "$bin" node "${args[@]}" --listen 127.0.0.1:$PORT --data-dir "$dir/data" > "$dir/node.log" 2>&1 &
  NODE=$!
  if [ ! -f "$dir/loaded" ]; then
    echo "== $name: load"
    $BIN load --addr 127.0.0.1:$PORT --items "$ITEMS" --users "$USERS" --events "$EVENTS" --quiet
    touch "$dir/loaded"
  fi
}
runs=("native:$BIN:config/node.toml" "ort:$BIN:config/node.toml:$WORK/ort.toml")
if [ -n "${OLD_BIN:-}" ]; then runs=("older:$OLD_BIN:$OLD_CONFIG" "${runs[@]}"); fi
for round in $(seq "$ROUNDS"); do
  for run in "${runs[@]}"; do
    IFS=: read -r name bin cfgs <<< "$run"
    IFS=: read -r -a cfg <<< "$cfgs"
    # The native and ort runs share one data dir (same build, same stored world).
    data=$name; [ "$name" = ort ] && data=native
    start "$data" "$bin" "${cfg[@]}"
    for c in 4 16; do
      echo "== round $round, $name, concurrency $c"
      $BIN bench --addr 127.0.0.1:$PORT --concurrency $c --requests "$REQUESTS" --users "$USERS"
    done
    stop
  done
done
