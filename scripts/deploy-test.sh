#!/usr/bin/env bash
# The deploy test (scripts/test.sh runs it): what an operator applies must build, start and answer.
#
# 1. Kubernetes: renders cluster/k8s/overlays/{dev,prod} with `kubectl kustomize` and validates every
#    rendered object against the Kubernetes schemas (kubernetes-validate --strict); the
#    ServiceMonitor is a CRD without a schema there, so it is checked structurally instead (it must
#    select the headless Service and name its metrics port). Also checks what schemas cannot: the
#    base's node.toml is config/node.toml, replicas = initial nodes = seeds, the Secret has the keys
#    the pods read, prod has its PDB, anti-affinity and resources, the pods run as 10001.
# 2. Docker: starts its own Docker daemon (with --iptables=false, so the host's iptables FORWARD
#    policy stays as it was: Docker's default DROP breaks the chaos suite's network-namespace
#    bridge), builds the image with scripts/image.sh, starts cluster/compose.yaml's three nodes,
#    waits for their health checks, loads a small world through n1, asks n3 for recommendations and
#    n2 for page 2, checks that a wrong operator token is refused, that a published port answers
#    from the host and that the node runs as uid 10001; then removes everything it started
#    (containers, network, volumes, image, the daemon and its files) and checks that iptables FORWARD
#    and net.ipv4.ip_forward are as it found them. Where no Docker daemon can start (not root, no
#    apt, the daemon fails), it says why and skips this part; the Kubernetes part still runs.
#
# Installs what it needs when missing: Debian docker.io and docker-compose (apt), kubernetes-validate
# (pip); kubectl is the machine's (Debian's kubernetes-client otherwise). Every wait is bounded.
# Env: DEPLOY_TEST_SKIP_DOCKER=1 skips part 2; DEPLOY_TEST_KEEP=1 keeps the temp dir for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS
ME=deploy-test
KV_VERSION=1.37.0                   # kubernetes-validate (its schemas: Kubernetes 1.37)

say() { echo "$ME: $*"; }
fail() { echo "$ME: FAIL: $*" >&2; exit 1; }
elapsed() { echo "$((SECONDS - T0)) s"; }

WORK=$(mktemp -d /tmp/recsys-deploy.XXXXXX)
DOCKERD_PID=""
COMPOSE_UP=0
PROJECT="rdt$$"
IMAGE="recsys:deploy-test-$$"
FWD_BEFORE=""
IPFWD_BEFORE=""
COMPOSE=()
SKIPPED=""

# --- cleanup: runs on every exit, success or failure ----------------------------------------------
iptables_forward() {  # the FORWARD chain of every iptables backend present, one rule a line
  local t
  for t in iptables iptables-legacy; do
    command -v "$t" >/dev/null || continue
    echo "# $t"
    timeout 10 "$t" -w 5 -S FORWARD 2>/dev/null || echo "(unreadable)"
  done
}

cleanup() {
  local rc=$? now
  set +e
  if [ "$COMPOSE_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      say "logs of the nodes (last 30 lines each):"
      for n in n1 n2 n3; do timeout 20 "${COMPOSE[@]}" logs --no-color --tail 30 "$n" 2>&1 | sed "s/^/  /"; done
    fi
    say "removing the compose cluster (containers, network, volumes)"
    timeout 90 "${COMPOSE[@]}" down -v --remove-orphans -t 15 >"$WORK/down.log" 2>&1 \
      || { cat "$WORK/down.log"; rc=1; }
  fi
  if [ -n "$DOCKERD_PID" ]; then
    timeout 30 docker rmi -f "$IMAGE" >/dev/null 2>&1
    say "stopping the Docker daemon it started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 150); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      say "dockerd did not exit in 30 s: SIGKILL"
      kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
    # dockerd's own containerd and shims live under $WORK; none may outlive the test.
    for p in $(pgrep -f "$WORK" 2>/dev/null); do
      [ "$p" != $$ ] && kill -KILL "$p" 2>/dev/null
    done
  fi
  # Anything still mounted under the temp dir (overlay layers, netns) goes before the dir does.
  grep -o " ${WORK}[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  if [ -n "$FWD_BEFORE" ]; then
    now=$(iptables_forward)
    if [ "$now" != "$FWD_BEFORE" ]; then
      echo "$ME: FAIL: the iptables FORWARD chain changed; restoring its policy. Before:" >&2
      echo "$FWD_BEFORE" >&2
      echo "after:" >&2
      echo "$now" >&2
      local pol
      pol=$(grep -m1 -oP '^-P FORWARD \K\w+' <<<"$FWD_BEFORE")
      [ -z "$pol" ] || timeout 10 iptables -w 5 -P FORWARD "$pol"
      rc=1
    else
      say "iptables FORWARD as found: $(grep -oP '^-P FORWARD \K\w+' <<<"$now" | paste -sd/ -)"
    fi
  fi
  if [ -n "$IPFWD_BEFORE" ] && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$IPFWD_BEFORE" ]; then
    echo "$ME: FAIL: net.ipv4.ip_forward changed; restoring $IPFWD_BEFORE" >&2
    echo "$IPFWD_BEFORE" >/proc/sys/net/ipv4/ip_forward
    rc=1
  fi
  if [ "${DEPLOY_TEST_KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  if [ "$rc" = 0 ]; then say "passed in $(elapsed)${SKIPPED:+ (Docker part skipped: $SKIPPED)}"; else echo "$ME: failed (exit $rc) after $(elapsed)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- installs -------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {  # apt_install PACKAGE...: Debian packages, without starting their services
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  local policy=/usr/sbin/policy-rc.d made=0 ok=0
  if [ ! -e "$policy" ]; then  # no service may start during the install (dockerd with iptables!)
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made=1
  fi
  say "installing $* (apt)"
  if [ "$APT_UPDATED" = 0 ] && ! apt-cache show "$@" >/dev/null 2>&1; then
    timeout 300 apt-get update -qq && APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "$@" \
    >"$WORK/apt.log" 2>&1 && ok=1
  if [ "$ok" = 0 ] && [ "$APT_UPDATED" = 0 ]; then
    timeout 300 apt-get update -qq && APT_UPDATED=1
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "$@" \
      >"$WORK/apt.log" 2>&1 && ok=1
  fi
  [ "$made" = 0 ] || rm -f "$policy"
  [ "$ok" = 1 ] || { tail -5 "$WORK/apt.log" >&2; return 1; }
}

# --- 1. Kubernetes: render the overlays, validate them --------------------------------------------
if ! command -v kubectl >/dev/null; then
  apt_install kubernetes-client || fail "kubectl not found and Debian's kubernetes-client could not be installed"
fi
if ! python3 -c "import kubernetes_validate" 2>/dev/null; then
  say "installing kubernetes-validate==$KV_VERSION (pip)"
  timeout 300 python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
    || fail "pip install kubernetes-validate failed"
fi
python3 -c "import yaml" 2>/dev/null || fail "python3 has no yaml module (kubernetes-validate should have brought PyYAML)"

cmp -s config/node.toml cluster/k8s/base/node.toml \
  || fail "cluster/k8s/base/node.toml differs from config/node.toml: cp config/node.toml cluster/k8s/base/node.toml"

# Render from a copy: the prod overlay reads secrets.env, which an operator writes (never committed).
cp -r cluster/k8s "$WORK/k8s"
printf 'cluster-secret=%s\noperator-token=%s\n' "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" \
  "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" >"$WORK/k8s/overlays/prod/secrets.env"
for overlay in dev prod; do
  timeout 60 kubectl kustomize "$WORK/k8s/overlays/$overlay" >"$WORK/$overlay.yaml" 2>"$WORK/$overlay.err" \
    || { cat "$WORK/$overlay.err" >&2; fail "kubectl kustomize cluster/k8s/overlays/$overlay failed"; }
  [ ! -s "$WORK/$overlay.err" ] || { say "kustomize said for $overlay:"; sed 's/^/  /' "$WORK/$overlay.err"; }
  # Schemas: every kind but the CRD (kubernetes-validate knows only built-in kinds).
  python3 - "$WORK/$overlay.yaml" "$WORK/$overlay.builtin.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
for d in docs:
    if d not in builtin:
        print(f"deploy-test: {d['kind']}/{d['metadata']['name']}: a CRD ({d['apiVersion']}), not in the "
              "Kubernetes schemas: checked structurally below instead")
yaml.safe_dump_all(builtin, open(sys.argv[2], "w"), sort_keys=False)
PY
  if ! (cd "$WORK" && timeout 120 python3 -m kubernetes_validate --strict --quiet "$overlay.builtin.yaml") \
    >"$WORK/$overlay.validate" 2>&1; then
    cat "$WORK/$overlay.validate" >&2
    fail "the $overlay overlay does not validate against the Kubernetes schemas"
  fi
  kinds=$(python3 -c "import sys,yaml; print(' '.join(sorted(d['kind'] for d in yaml.safe_load_all(open(sys.argv[1])) if d)))" "$WORK/$overlay.yaml")
  say "$overlay overlay: valid against Kubernetes $KV_VERSION schemas (strict): $kinds"
done

# What the schemas cannot see.
python3 - "$WORK/dev.yaml" "$WORK/prod.yaml" <<'PY'
import sys, tomllib, yaml

def load(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]

def check(overlay, docs, nodes):
    sts = one(docs, "StatefulSet", "recsys")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert spec["replicas"] == nodes, f"{overlay}: replicas {spec['replicas']}, expected {nodes}"
    # members.toml: initial nodes and seeds are exactly the StatefulSet's pods.
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    members_cm = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "members")
    members = tomllib.loads(cms[members_cm]["data"]["members.toml"])
    pods = [f"recsys-{i}" for i in range(spec["replicas"])]
    assert members["cluster"]["initial_nodes"] == pods, f"{overlay}: initial_nodes {members['cluster']['initial_nodes']} != {pods}"
    assert members["node"]["seeds"] == [f"{p}.{spec['serviceName']}:7400" for p in pods], f"{overlay}: seeds"
    config_cm = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")
    tomllib.loads(cms[config_cm]["data"]["node.toml"])
    args = c["args"]
    assert "--config=/etc/recsys/config/node.toml" in args and "--config=/etc/recsys/members/members.toml" in args, args
    # Secrets: the pods read keys the Secret has.
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            s = secrets.get(ref["name"])
            assert s, f"{overlay}: env {e['name']} reads Secret {ref['name']}, which is not rendered"
            assert ref["key"] in s.get("data", {}), f"{overlay}: Secret {ref['name']} has no key {ref['key']}"
    names = {e["name"] for e in c["env"]}
    assert {"RECSYS_CLUSTER_SECRET", "RECSYS_OPERATOR_TOKEN"} <= names, f"{overlay}: secrets not in env"
    # Non-root, as the image's user.
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001, f"{overlay}: pod securityContext {sc}"
    # The headless Service publishes not-ready pods (the first ring forms before any is Ready).
    headless = one(docs, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    return sts, headless

dev, prod = load(sys.argv[1]), load(sys.argv[2])
check("dev", dev, 3)
sts, headless = check("prod", prod, 5)
pod = sts["spec"]["template"]["spec"]
res = pod["containers"][0]["resources"]
assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"], f"prod resources {res}"
anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in anti), "prod: no hostname anti-affinity"
labels = sts["spec"]["template"]["metadata"]["labels"]
pdb = one(prod, "PodDisruptionBudget")
assert pdb["spec"]["maxUnavailable"] == 1
assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()), "prod: PDB selects no pod"
assert not [d for d in dev if d["kind"] in ("PodDisruptionBudget", "ServiceMonitor")], "dev has prod-only objects"
# The ServiceMonitor (a CRD): its selector finds the headless Service, its endpoints name its ports.
sm = one(prod, "ServiceMonitor")
assert sm["apiVersion"] == "monitoring.coreos.com/v1", sm["apiVersion"]
sel = sm["spec"]["selector"]["matchLabels"]
svc_labels = headless["metadata"]["labels"]
assert all(svc_labels.get(k) == v for k, v in sel.items()), f"ServiceMonitor selects {sel}, headless has {svc_labels}"
others = [d for d in prod if d["kind"] == "Service" and d is not headless
          and all(d["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
assert not others, "ServiceMonitor also selects the client Service (pods would be scraped twice)"
ports = {p["name"] for p in headless["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    assert ep["port"] in ports, f"ServiceMonitor endpoint port {ep['port']} not among {ports}"
print("deploy-test: overlays: dev 3 nodes, prod 5 nodes; members, secrets, PDB, anti-affinity, resources,"
      " ServiceMonitor -> headless Service metrics port: consistent")
PY
say "Kubernetes part done ($(elapsed))"

# --- 2. Docker: image, 3-node compose cluster, a load and a recommendation -------------------------
skip_docker() { SKIPPED=$*; say "SKIPPED the Docker part: $*"; exit 0; }
[ "${DEPLOY_TEST_SKIP_DOCKER:-0}" != 1 ] || skip_docker "DEPLOY_TEST_SKIP_DOCKER=1"
[ "$(id -u)" = 0 ] || skip_docker "not root: this test starts its own Docker daemon, which needs root"
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
  apt_install docker.io || skip_docker "no dockerd, and Debian's docker.io could not be installed"
fi
if ! command -v docker-compose >/dev/null; then
  apt_install docker-compose || skip_docker "no docker-compose, and Debian's docker-compose could not be installed"
fi
IPFWD_BEFORE=$(cat /proc/sys/net/ipv4/ip_forward)
FWD_BEFORE=$(iptables_forward)
say "iptables FORWARD before: $(grep -oP '^-P FORWARD \K\w+' <<<"$FWD_BEFORE" | paste -sd/ -) (restored if changed)"

# Its own daemon, on its own socket, with every file under $WORK: --iptables=false leaves the host's
# packet filter alone (compose's network is a plain bridge: containers on it reach each other;
# published ports go through docker-proxy on the host's loopback).
export DOCKER_HOST="unix://$WORK/docker.sock"
mkdir -p "$WORK/docker" "$WORK/exec"
dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
  --host "$DOCKER_HOST" --data-root "$WORK/docker" --exec-root "$WORK/exec" \
  --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
deadline=$((SECONDS + 60))
until timeout 5 docker version --format '{{.Server.Version}}' >"$WORK/server.version" 2>/dev/null; do
  if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
    DOCKERD_PID=""
    tail -5 "$WORK/dockerd.log" | sed 's/^/  /'
    skip_docker "the Docker daemon exited at start (its last log lines above)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    tail -5 "$WORK/dockerd.log" | sed 's/^/  /'
    skip_docker "the Docker daemon did not answer within 60 s (its last log lines above)"
  fi
  sleep 0.2
done
say "Docker daemon $(cat "$WORK/server.version") up (pid $DOCKERD_PID, --iptables=false) in $(elapsed)"
[ "$(iptables_forward)" = "$FWD_BEFORE" ] || fail "starting dockerd changed the iptables FORWARD chain"

if [ -x target/release/recsys ] && [ -f .cache/onnxruntime/libonnxruntime.so.1.32.0 ]; then
  export SKIP_SETUP=1
fi
IMAGE="$IMAGE" timeout 600 scripts/image.sh >"$WORK/image.log" 2>&1 \
  || { tail -30 "$WORK/image.log" >&2; fail "scripts/image.sh failed"; }
say "image $IMAGE built ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $(elapsed)"
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || fail "the image does not run as 10001:10001"

# Compose: the repository's file, plus an override that only moves the host ports to free ones and
# gives the network a fixed private subnet of its own.
cat >"$WORK/override.yaml" <<'EOF'
networks:
  default:
    ipam:
      config:
        - subnet: 10.219.0.0/24
EOF
export RECSYS_IMAGE="$IMAGE"
RECSYS_CLUSTER_SECRET="secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
RECSYS_OPERATOR_TOKEN="token-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export RECSYS_CLUSTER_SECRET RECSYS_OPERATOR_TOKEN
for n in 1 2 3; do export "RECSYS_N${n}_GRPC=127.0.0.1:" "RECSYS_N${n}_METRICS=127.0.0.1:"; done
COMPOSE=(docker-compose --ansi never -p "$PROJECT" -f "$ROOT/cluster/compose.yaml" -f "$WORK/override.yaml")
COMPOSE_UP=1
timeout 180 "${COMPOSE[@]}" up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up failed"; }

cid() { "${COMPOSE[@]}" ps -q "$1"; }
deadline=$((SECONDS + 180))
while :; do
  states=""
  healthy=0
  for n in n1 n2 n3; do
    s=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$(cid $n)")
    states+="$n=$s "
    [ "$s" = running/healthy ] && healthy=$((healthy + 1))
    [[ $s == running/* ]] || fail "$n is not running ($s)"
  done
  [ "$healthy" = 3 ] && break
  [ "$SECONDS" -lt "$deadline" ] || fail "the nodes were not all healthy within 180 s: $states"
  sleep 0.5
done
say "3 nodes healthy (recsys health = SERVING) in $(elapsed)"

exec_in() {  # exec_in NODE SECONDS ARGS...: a command in a node's container, bounded
  local n=$1 t=$2
  shift 2
  timeout "$t" "${COMPOSE[@]}" exec -T "$n" "$@"
}
out=$(exec_in n1 120 recsys load --items 3000 --users 300 --events 30000 --quiet 2>&1) \
  || fail "load through n1 failed: $out"
grep -q "^loaded 3000 items, 300 users, 30000 events" <<<"$out" || fail "load through n1: unexpected: $out"
say "n1: $out"

out=$(exec_in n3 60 recsys recommend --user u42 --k 8 2>&1) || fail "recommend from n3 failed: $out"
items=$(grep -cE '^  #[0-9]+ ' <<<"$out" || true)
[ "$items" = 8 ] || fail "recommend from n3: $items items, expected 8: $out"
grep -q "degraded: no" <<<"$out" || fail "recommend from n3 was degraded: $out"
grep -q "models m" <<<"$out" || fail "recommend from n3 did not use the models: $out"
token=$(grep -oP 'next_page_token: \K\S+' <<<"$out") || fail "recommend from n3: no next_page_token: $out"
say "n3: 8 items for u42 ($(head -1 <<<"$out"))"

# Page 2 through n2: the token is signed with the cluster secret and names the node holding the list.
out=$(exec_in n2 60 recsys recommend --user u42 --k 8 --page-token "$token" 2>&1) || fail "page 2 from n2 failed: $out"
[ "$(grep -cE '^  #[0-9]+ ' <<<"$out" || true)" -ge 1 ] || fail "page 2 from n2: no items: $out"
grep -qE '^  #9 ' <<<"$out" || fail "page 2 from n2 does not start at rank 9: $out"
say "n2: page 2 of n3's list (ranks 9..)"

# The operator token guards Admin: a wrong one is refused.
if out=$(exec_in n1 30 recsys status --token wrong 2>&1); then
  fail "recsys status with a wrong operator token was answered: $out"
fi
grep -q UNAUTHENTICATED <<<"$out" || fail "a wrong operator token: expected UNAUTHENTICATED, got: $out"
say "a wrong operator token is refused: $(head -1 <<<"$out")"
# Every partition with both replicas live, three nodes serving, as n1 sees it (bounded poll: a
# node's view of the others' partitions settles a moment after it serves).
deadline=$((SECONDS + 30))
until out=$(exec_in n1 30 recsys status 2>&1) \
  && grep -qE "^partitions: 64 total, 0 with a replica down, 0 with no live replica" <<<"$out" \
  && [ "$(grep -cE '^  n[123] .* serving ' <<<"$out" || true)" = 3 ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "status: not three serving nodes with every replica live within 30 s: $out"
  sleep 0.5
done
say "n1 status: 3 nodes serving, 64 partitions with every replica live"

# From the host through a published port (docker-proxy), with the host's own client.
port=$("${COMPOSE[@]}" port n2 7400)
if [ -x target/release/recsys ]; then
  out=$(timeout 30 target/release/recsys recommend --addr "$port" --user u7 --k 3 2>&1) \
    || fail "recommend from the host via n2's published port $port failed: $out"
  [ "$(grep -cE '^  #[0-9]+ ' <<<"$out" || true)" = 3 ] || fail "recommend via $port: $out"
  say "host: 3 items for u7 via n2's published port $port"
fi

# Non-root for real: the node process's uid, as the host's /proc sees it.
pid=$(docker inspect -f '{{.State.Pid}}' "$(cid n1)")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[ "$uid" = 10001 ] || fail "the node in n1 runs as uid $uid, not 10001"
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$vols" = 3 ] || fail "expected 3 named data volumes, found $vols"
say "nodes run as uid 10001; data on 3 named volumes"

# Teardown is part of the test: nothing of the project may remain.
timeout 90 "${COMPOSE[@]}" down -v --remove-orphans -t 15 >"$WORK/down.log" 2>&1 \
  || { cat "$WORK/down.log" >&2; fail "compose down failed"; }
COMPOSE_UP=0
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
left_v=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
left_n=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left$left_v$left_n" = 000 ] || fail "after down: $left containers, $left_v volumes, $left_n networks left"
say "compose cluster removed (containers, network, volumes) in $(elapsed)"
