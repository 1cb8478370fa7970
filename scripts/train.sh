#!/usr/bin/env bash
# Reproducible training run (never run by CI): serve a synthetic world with the heuristic scorer,
# let simulated users react, join the served feature rows with their events, train, export ONNX.
#   scripts/train.sh            # full world (100k items, 10k users, 1M events), 8000 simulated requests
#   ITEMS=5000 USERS=500 EVENTS=50000 REQUESTS=2000 MODELS_OUT=/tmp/m scripts/train.sh   # quick, elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${ITEMS:-100000} USERS=${USERS:-10000} EVENTS=${EVENTS:-1000000} REQUESTS=${REQUESTS:-8000} SEED=${SEED:-42}
PORT=${PORT:-7490}
scripts/setup.sh
if [ ! -x training/.venv/bin/python ]; then
  python3 -m venv training/.venv
  training/.venv/bin/pip install --quiet -r training/requirements.txt
fi
DATA=data/train
rm -rf "$DATA" && mkdir -p "$DATA" training/out
target/release/recsys node --listen 127.0.0.1:$PORT --data-dir "$DATA" --models-dir "$DATA/no-models" > "$DATA/node.log" 2>&1 &
NODE=$!
trap 'kill $NODE 2>/dev/null || true' EXIT
target/release/recsys load --addr 127.0.0.1:$PORT --seed $SEED --items $ITEMS --users $USERS --events $EVENTS --quiet
target/release/recsys simulate --addr 127.0.0.1:$PORT --seed $SEED --items $ITEMS --users $USERS --requests $REQUESTS --k 30
kill -TERM $NODE; wait $NODE || true
training/.venv/bin/python training/make_dataset.py --logs "$DATA/logs" --out training/out/dataset.parquet
training/.venv/bin/python training/train.py --data training/out/dataset.parquet --out "${MODELS_OUT:-models}"
