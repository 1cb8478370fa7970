#!/usr/bin/env bash
# The test command (CI runs exactly this): install what is needed (ONNX Runtime, promtool, the
# release build), then unit tests, the multi-process integration tests in tests/ (operator.rs needs
# promtool) and the fault scenarios in chaos/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --locked -- --test-threads=1
