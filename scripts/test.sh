#!/usr/bin/env bash
# The test command (CI runs exactly this): install what is needed (ONNX Runtime, promtool, the
# release build), then unit tests, the multi-process integration tests in tests/ (operator.rs needs
# promtool), the fault tests in chaos/, the deploy test (image, 3-node compose cluster, Kubernetes
# overlays validated; ~1 min warm, prints its own timing), the chaos suite's short set
# (chaos/run --short, ~1.5 min) and a 2-minute randomized nemesis (seed 1: kills, freezes,
# isolations, failed RPCs, a join and a drain under load; judged read-only on safety).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --locked -- --test-threads=1
scripts/deploy-test.sh
CHAOS_SKIP_SETUP=1 chaos/run --short
CHAOS_SKIP_SETUP=1 chaos/run --nemesis --seed 1 --seconds 120
