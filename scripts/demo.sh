#!/usr/bin/env bash
# The main job: install what is needed (ONNX Runtime, release build), start a node, load the
# synthetic world (100k items, 10k users, 1M events), print recommendations with explanations and
# a latency summary, then keep serving until Ctrl-C. Extra arguments go to `recsys demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/recsys demo "$@"
