#!/usr/bin/env bash
# Renders a node's status page in real headless Chromium (Debian's `chromium`, installed here when
# missing) and saves a screenshot. Starts a 3-node local cluster (cluster/local.sh, ports 7401-7403
# and 9401-9403, its own data dir under /tmp), loads a small world, runs a short bench so the page
# has latencies, SIGKILLs n3 so the page shows a node down, then screenshots n1's /status and checks
# the DOM the page's script rendered (nodes table, both rings, replicas not live). Not a test-suite
# step (the suite checks the page's content over HTTP in tests/operator.rs).
#   scripts/status-screenshot.sh                # writes docs/status-page.png
#   scripts/status-screenshot.sh /tmp/page.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/status-page.png}
SKIP_BUILD=${SKIP_BUILD:-0} scripts/setup.sh
if ! command -v chromium > /dev/null; then
  [ "$(id -u)" = 0 ] || { echo "status-screenshot: needs chromium (Debian package chromium); run as root to install it" >&2; exit 1; }
  echo "status-screenshot: installing chromium (Debian package)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null; }
fi
BIN=target/release/recsys
export RECSYS_CLUSTER_DIR
RECSYS_CLUSTER_DIR=$(mktemp -d /tmp/recsys-status-shot.XXXXXX)
PROFILE=$(mktemp -d /tmp/recsys-chromium.XXXXXX)
cleanup() { cluster/local.sh down > /dev/null 2>&1 || true; rm -rf "$RECSYS_CLUSTER_DIR" "$PROFILE"; }
trap cleanup EXIT
cluster/local.sh up 3
$BIN load --addr 127.0.0.1:7401 --items 20000 --users 2000 --events 200000 --quiet
$BIN bench --addr 127.0.0.1:7401 --concurrency 4 --requests 600 --users 2000 | head -2
cluster/local.sh kill n3
# Bounded wait until n1's failure detector calls n3 down (polling its status JSON).
for _ in $(seq 150); do
  curl -sf http://127.0.0.1:9401/status.json | grep -q '"live":false' && break
  sleep 0.2
done
URL=http://127.0.0.1:9401/status
chrome() {
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$PROFILE" \
    --virtual-time-budget=5000 "$@" 2> /dev/null
}
mkdir -p "$(dirname "$OUT")"
chrome --window-size=1400,1080 --screenshot="$OUT" "$URL"
DOM=$(chrome --dump-dom "$URL")
fail() { echo "status-screenshot: the rendered page $*" >&2; exit 1; }
grep -q 'data-rendered="yes"' <<< "$DOM" || fail "never rendered status.json"
[ "$(grep -o '<tr data-node="n[0-9]"' <<< "$DOM" | sort -u | wc -l)" = 3 ] || fail "does not list three nodes"
grep -q 'data-role="generator"' <<< "$DOM" && grep -q 'data-role="feature"' <<< "$DOM" || fail "lacks a ring"
grep -q 'data-live="false"' <<< "$DOM" || fail "does not show n3's replicas as not live"
grep -q 'class="badge down"' <<< "$DOM" || fail "does not show n3 down"
echo "status-screenshot: page rendered and checked; screenshot in $OUT"
