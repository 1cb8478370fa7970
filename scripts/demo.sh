#!/usr/bin/env bash
# The main job: install what is needed (ONNX Runtime, release build), start a 3-node cluster on
# 127.0.0.1:7401-7403, load the synthetic world (100k items, 10k users, 1M events) through n1, print
# recommendations asked of n3 (page 2 through n2) with explanations and a latency summary, then keep
# serving until Ctrl-C. Extra arguments go to `recsys demo` (`--nodes 1` for a single node).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/recsys demo "$@"
