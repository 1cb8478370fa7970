#!/usr/bin/env bash
# Installs what the project needs on a fresh machine: the ONNX Runtime shared library (from the
# onnxruntime wheel on PyPI; ort loads it dynamically) and a release build of the `recsys` binary.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.32.0
ORT_DIR=.cache/onnxruntime
ORT_LIB="$ORT_DIR/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$ORT_LIB" ]; then
  echo "setup: fetching onnxruntime==$ORT_VERSION from PyPI for its shared library"
  mkdir -p .cache/ort-wheel "$ORT_DIR"
  python3 -m pip download --quiet "onnxruntime==$ORT_VERSION" --no-deps -d .cache/ort-wheel
  python3 - "$ORT_LIB" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob(".cache/ort-wheel/onnxruntime-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/libonnxruntime.so.1.32.0"))
    with open(sys.argv[1], "wb") as f:
        f.write(z.read(name))
PY
fi
echo "setup: ONNX Runtime at $ORT_LIB"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --locked 2>&1 | tail -n 3
fi
