#!/usr/bin/env bash
# Local cluster launcher: runs N `recsys node` processes on 127.0.0.1 as one cluster.
# Node nK listens on 127.0.0.1:(7400+K) for gRPC (TCP) and gossip (UDP), metrics on 9400+K; its data
# dir, log, pid file and recorded arguments live under $RECSYS_CLUSTER_DIR (default data/cluster).
# Relative paths in RECSYS_BIN and RECSYS_CLUSTER_DIR are taken from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${RECSYS_BIN:-target/release/recsys}"
DIR="${RECSYS_CLUSTER_DIR:-data/cluster}"
HOST=127.0.0.1
GRPC_BASE=7400                            # nK: gRPC + gossip on GRPC_BASE+K
METRICS_BASE=9400                         # nK: Prometheus metrics on METRICS_BASE+K
WAIT_SECS="${RECSYS_WAIT_SECS:-120}"      # bound on waiting for SERVING
STOP_SECS="${RECSYS_STOP_SECS:-30}"       # bound on waiting for a clean exit after SIGTERM
ME="cluster/local.sh"

usage() {
  cat <<EOF
usage: $ME COMMAND [ARGS]
  up [N]         start nodes n1..nN (default 3) and wait until every one is SERVING
  join NODE      start a new node (e.g. n4) with --join and wait until the ring has taken it in
  down           SIGTERM every node, wait up to ${STOP_SECS}s, then SIGKILL stragglers
  status         local processes, then \`recsys status\` from the first running node
  stop NODE      SIGTERM one node and wait for it to exit
  kill NODE      SIGKILL one node
  pause NODE     SIGSTOP one node (it stays a member but stops answering)
  resume NODE    SIGCONT a paused node
  restart NODE   start a node again with its recorded arguments (stopping it first if running)
  logs NODE [-f] last 100 lines of the node's log (-f: follow)
env: RECSYS_BIN ($BIN), RECSYS_CLUSTER_DIR ($DIR), RECSYS_WAIT_SECS ($WAIT_SECS), RECSYS_STOP_SECS ($STOP_SECS)
EOF
}

die() { echo "$ME: $*" >&2; exit 1; }
say() { echo "$ME: $*"; }
addr_of() { echo "$HOST:$((GRPC_BASE + ${1#n}))"; }
pid_of() { cat "$DIR/$1.pid" 2>/dev/null || true; }

# Nodes recorded by the last `up`, in numeric order (n1 n2 ... n10).
nodes() {
  local f
  for f in "$DIR"/n*.args; do
    [ -e "$f" ] && basename "$f" .args
  done | sort -k1.2n
}

# running | paused | dead. A zombie or a reused pid (cmdline without our --node-id) counts as dead.
state_of() {
  local pid st
  pid=$(pid_of "$1")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo dead; return; fi
  if [ -r "/proc/$pid/stat" ]; then
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *" --node-id $1 "* ]] || { echo dead; return; }
    st=$(sed 's/.*) //' "/proc/$pid/stat")
  else
    st=$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ') || true
  fi
  case "${st:0:1}" in
    "" | Z | X) echo dead ;;
    T | t) echo paused ;;
    *) echo running ;;
  esac
}

need_node() {
  [ -n "${1:-}" ] || die "$CMD needs a node name, e.g. '$ME $CMD n2'"
  if [[ ! $1 =~ ^n[1-9][0-9]*$ ]] || [ ! -f "$DIR/$1.args" ]; then
    die "unknown node '$1' (nodes from the last up: $(nodes | xargs echo))"
  fi
}

need_bin() { [ -x "$BIN" ] || die "no executable at $BIN: run scripts/setup.sh or set RECSYS_BIN"; }

port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

start_node() {
  local node=$1 args
  mapfile -t args <"$DIR/$node.args"
  port_busy "$(addr_of "$node")" && die "$(addr_of "$node") is already in use: is another cluster running?"
  echo "=== $(date '+%F %T') $ME starting $BIN ${args[*]}" >>"$DIR/$node.log"
  nohup "$BIN" "${args[@]}" </dev/null >>"$DIR/$node.log" 2>&1 &
  echo $! >"$DIR/$node.pid"
}

# Polls `recsys status` on each node until it succeeds; fails fast if a node exits.
wait_serving() {
  local deadline=$((SECONDS + WAIT_SECS)) node
  for node in "$@"; do
    until timeout 10 "$BIN" status --addr "$(addr_of "$node")" >/dev/null 2>&1; do
      if [ "$(state_of "$node")" = dead ]; then
        tail -n 20 "$DIR/$node.log" >&2
        die "$node exited before serving (log: $DIR/$node.log); other nodes keep running, '$ME down' stops them"
      fi
      [ "$SECONDS" -lt "$deadline" ] || die "$node not serving after ${WAIT_SECS}s (log: $DIR/$node.log)"
      sleep 0.2
    done
    say "$node serving on $(addr_of "$node")"
  done
}

# Waits (bounded by STOP_SECS) until none of the given nodes is alive; prints the ones still alive.
wait_exit() {
  local deadline=$((SECONDS + STOP_SECS)) node left=("$@")
  while [ ${#left[@]} -gt 0 ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.2
    local still=()
    for node in "${left[@]}"; do [ "$(state_of "$node")" = dead ] || still+=("$node"); done
    left=("${still[@]+"${still[@]}"}")
  done
  echo "${left[@]+"${left[@]}"}"
}

term_node() {  # SIGTERM (and SIGCONT, so a paused node can act on it)
  kill -TERM "$(pid_of "$1")" 2>/dev/null || true
  kill -CONT "$(pid_of "$1")" 2>/dev/null || true
}

cmd_up() {
  local n=${1:-3} k port node ids=() addrs=() seeds args
  [[ $n =~ ^[1-9][0-9]?$ ]] || die "up: N must be a number from 1 to 99, got '$n'"
  need_bin
  for node in $(nodes); do
    [ "$(state_of "$node")" = dead ] || die "$node is still running (pid $(pid_of "$node")): run '$ME down' first"
  done
  mkdir -p "$DIR"
  rm -f "$DIR"/n*.args "$DIR"/n*.pid
  for ((k = 1; k <= n; k++)); do
    ids+=("n$k"); addrs+=("$(addr_of "n$k")")
    for port in "$((GRPC_BASE + k))" "$((METRICS_BASE + k))"; do
      ! port_busy "$HOST:$port" || die "$HOST:$port is already in use: is another cluster or node running?"
    done
  done
  for ((k = 1; k <= n; k++)); do
    node=n$k
    seeds=$(printf '%s\n' "${addrs[@]}" | grep -vxF "$(addr_of "$node")" | paste -sd, -) || true
    args=(node)
    if [ -f "cluster/config/$node.toml" ]; then
      args+=(--config config/node.toml --config "cluster/config/$node.toml")
    fi
    # Flags always win over the files, so `up 2` or another RECSYS_CLUSTER_DIR stay consistent.
    args+=(--node-id "$node" --listen "$(addr_of "$node")" --data-dir "$DIR/$node"
      --metrics-listen "$HOST:$((METRICS_BASE + k))" --initial-nodes "$(IFS=,; echo "${ids[*]}")")
    [ -z "$seeds" ] || args+=(--seeds "$seeds")
    printf '%s\n' "${args[@]}" >"$DIR/$node.args"
    : >"$DIR/$node.log"
    start_node "$node"
    say "$node started (pid $(pid_of "$node"), log $DIR/$node.log)"
  done
  wait_serving "${ids[@]}"
  timeout 10 "$BIN" status --addr "$(addr_of n1)"
}

cmd_join() {
  local node=${1:-} k seeds args deadline
  [[ $node =~ ^n[1-9][0-9]?$ ]] || die "join: NODE must be n1..n99, e.g. '$ME join n4'"
  k=${node#n}
  need_bin
  [ ! -f "$DIR/$node.args" ] || [ "$(state_of "$node")" = dead ] || die "$node is already running"
  [ ! -e "$DIR/$node" ] || die "$DIR/$node exists: a joining node starts with an empty data dir (remove it first)"
  seeds=$(for n in $(nodes); do [ "$(state_of "$n")" = running ] && addr_of "$n"; done | paste -sd, -) || true
  [ -n "$seeds" ] || die "no running node to join: run '$ME up' first"
  args=(node --node-id "$node" --listen "$(addr_of "$node")" --data-dir "$DIR/$node"
    --metrics-listen "$HOST:$((METRICS_BASE + k))" --seeds "$seeds" --join)
  printf '%s\n' "${args[@]}" >"$DIR/$node.args"
  : >"$DIR/$node.log"
  start_node "$node"
  say "$node started (pid $(pid_of "$node"), log $DIR/$node.log); its partitions stream to it"
  deadline=$((SECONDS + WAIT_SECS))
  until timeout 10 "$BIN" status --addr "${seeds%%,*}" 2>/dev/null | grep -qE "^  $node +[^ ]+ +serving"; do
    if [ "$(state_of "$node")" = dead ]; then
      tail -n 20 "$DIR/$node.log" >&2
      die "$node exited while joining (log: $DIR/$node.log)"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "$node not serving after ${WAIT_SECS}s (log: $DIR/$node.log)"
    sleep 0.5
  done
  say "$node joined and serving on $(addr_of "$node")"
}

cmd_down() {
  local node live=() left
  for node in $(nodes); do
    if [ "$(state_of "$node")" = dead ]; then rm -f "$DIR/$node.pid"; continue; fi
    term_node "$node"
    live+=("$node")
  done
  [ ${#live[@]} -gt 0 ] || { say "no node is running"; return 0; }
  say "SIGTERM sent to ${live[*]}; waiting up to ${STOP_SECS}s"
  left=$(wait_exit "${live[@]}")
  for node in $left; do
    say "$node did not exit in ${STOP_SECS}s: SIGKILL"
    kill -KILL "$(pid_of "$node")" 2>/dev/null || true
  done
  # shellcheck disable=SC2086 # word splitting of the node list is intended
  [ -z "$left" ] || STOP_SECS=5 wait_exit $left >/dev/null
  for node in "${live[@]}"; do rm -f "$DIR/$node.pid"; done
  say "stopped ${live[*]}"
}

cmd_status() {
  local node first=""
  [ -n "$(nodes)" ] || die "no cluster in $DIR: run '$ME up' first"
  for node in $(nodes); do
    printf '%-4s %-16s pid %-8s %s\n' "$node" "$(addr_of "$node")" "$(pid_of "$node")" "$(state_of "$node")"
    [ -n "$first" ] || [ "$(state_of "$node")" != running ] || first=$node
  done
  [ -n "$first" ] || die "no node is running"
  need_bin
  echo "--- recsys status --addr $(addr_of "$first")"
  timeout 10 "$BIN" status --addr "$(addr_of "$first")"
}

CMD=${1:-}
[ $# -eq 0 ] || shift
case "$CMD" in
  up) cmd_up "$@" ;;
  join) cmd_join "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  stop)
    need_node "${1:-}"
    [ "$(state_of "$1")" != dead ] || die "$1 is not running"
    term_node "$1"
    [ -z "$(wait_exit "$1")" ] || die "$1 still running after ${STOP_SECS}s: use '$ME kill $1'"
    rm -f "$DIR/$1.pid"; say "$1 stopped" ;;
  kill)
    need_node "${1:-}"
    [ "$(state_of "$1")" != dead ] || die "$1 is not running"
    kill -KILL "$(pid_of "$1")"
    STOP_SECS=5 wait_exit "$1" >/dev/null
    rm -f "$DIR/$1.pid"; say "$1 killed" ;;
  pause)
    need_node "${1:-}"
    [ "$(state_of "$1")" = running ] || die "$1 is not running (state: $(state_of "$1"))"
    kill -STOP "$(pid_of "$1")"; say "$1 paused" ;;
  resume)
    need_node "${1:-}"
    [ "$(state_of "$1")" = paused ] || die "$1 is not paused (state: $(state_of "$1"))"
    kill -CONT "$(pid_of "$1")"; say "$1 resumed" ;;
  restart)
    need_node "${1:-}"; need_bin
    if [ "$(state_of "$1")" != dead ]; then
      term_node "$1"
      [ -z "$(wait_exit "$1")" ] || die "$1 still running after ${STOP_SECS}s: use '$ME kill $1' first"
    fi
    start_node "$1"
    say "$1 started (pid $(pid_of "$1"))"
    wait_serving "$1" ;;
  logs)
    need_node "${1:-}"
    if [ "${2:-}" = -f ]; then exec tail -n 100 -f "$DIR/$1.log"; else tail -n 100 "$DIR/$1.log"; fi ;;
  -h | --help | help) usage ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$CMD' (commands: up join down status stop kill pause resume restart logs; '$ME help')" ;;
esac
