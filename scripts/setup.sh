#!/usr/bin/env bash
# Installs what the project needs on a fresh machine: the ONNX Runtime shared library (from the
# onnxruntime wheel on PyPI; ort loads it dynamically), promtool (Debian package `prometheus`, for
# the metrics and dashboard tests) and a release build of the `recsys` binary.
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
# Only the library is used; the wheel (~17 MB) is not kept.
rm -rf .cache/ort-wheel
echo "setup: ONNX Runtime at $ORT_LIB"
if ! command -v promtool > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "setup: installing promtool (Debian package prometheus)"
    install_prometheus() {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus > /dev/null
    }
    # The package lists are fetched only when missing or when they no longer name the package.
    install_prometheus || { apt-get update -qq && install_prometheus; }
  else
    echo "setup: promtool not found and cannot install it here (needs root + apt-get):" \
      "install the Debian package prometheus; the metrics tests fail without it" >&2
  fi
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # cargo's own progress stays visible: a first build takes ~7 minutes on 2 cores.
  echo "setup: cargo build --release (first build: ~7 min on 2 cores; later ones: seconds)"
  cargo build --release --locked
fi
