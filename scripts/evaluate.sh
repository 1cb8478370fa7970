#!/usr/bin/env bash
# Closes the loop: does the trained model give simulated users more of what they like than the
# heuristic (popularity × freshness) it was trained from? Two fresh nodes on the same world, the
# same number of simulated requests each; prints CTR and likes per impression of both arms.
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${ITEMS:-100000} USERS=${USERS:-10000} EVENTS=${EVENTS:-1000000} REQUESTS=${REQUESTS:-4000} SEED=${SEED:-42}
scripts/setup.sh
mkdir -p data
for arm in heuristic model; do
  DATA=data/eval-$arm; rm -rf "$DATA"
  MODELS=models; [ $arm = heuristic ] && MODELS="$DATA/none"
  target/release/recsys node --listen 127.0.0.1:7480 --data-dir "$DATA" --models-dir "$MODELS" > "$DATA.log" 2>&1 &
  NODE=$!
  target/release/recsys load --addr 127.0.0.1:7480 --seed $SEED --items $ITEMS --users $USERS --events $EVENTS --quiet > /dev/null
  echo "== $arm: $(target/release/recsys simulate --addr 127.0.0.1:7480 --seed $SEED --items $ITEMS --users $USERS --requests $REQUESTS --k 10 2>/dev/null)"
  kill -TERM $NODE; wait $NODE || true
done
