#!/usr/bin/env bash
# Builds the recsys node image (Dockerfile, FROM scratch) from files this machine already has: the
# release binary, the ONNX Runtime library, the models, the config and the shared libraries they
# link as `ldd` lists them. Stages them under target/image/context, then runs `docker build`.
#
#   scripts/image.sh                 # builds recsys:latest (runs scripts/setup.sh first unless SKIP_SETUP=1)
#   IMAGE=recsys:dev scripts/image.sh
#   STAGE_ONLY=1 scripts/image.sh    # stage the context only (no docker needed); prints its path
#
# Needs a Docker daemon (DOCKER_HOST as usual); no registry: nothing is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-recsys:latest}"
BIN=target/release/recsys
ORT_LIB=.cache/onnxruntime/libonnxruntime.so.1.32.0
CTX=target/image/context
UID_GID=10001
ME=scripts/image.sh

die() { echo "$ME: $*" >&2; exit 1; }

[ "${SKIP_SETUP:-0}" = 1 ] || scripts/setup.sh
[ -x "$BIN" ] || die "no release binary at $BIN: run scripts/setup.sh"
[ -f "$ORT_LIB" ] || die "no ONNX Runtime library at $ORT_LIB: run scripts/setup.sh"
[ -f models/manifest.json ] || die "no models/manifest.json"
command -v ldd >/dev/null || die "ldd not found (Debian package libc-bin)"

rm -rf "$CTX"
mkdir -p "$CTX/rootfs/usr/local/bin" "$CTX/rootfs/opt/recsys/lib" "$CTX/rootfs/etc/recsys" "$CTX/data"
root=$CTX/rootfs

# The shared libraries a file links, as ldd prints them: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6
# (0x...)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file. Each is copied
# (symlinks resolved) to the path ldd names, which is where the loader looks for it.
copy_libs() {
  local file=$1 out lib
  out=$(ldd "$file") || die "ldd $file failed: $out"
  if grep -q "not found" <<<"$out"; then
    die "ldd $file: a library is missing on this machine: $(grep 'not found' <<<"$out" | xargs)"
  fi
  while read -r lib; do
    [ -n "$lib" ] || continue
    if [ ! -e "$root$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    fi
  done < <(awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }' <<<"$out")
}

cp "$BIN" "$root/usr/local/bin/recsys"
# The release profile keeps debug info (for profiles and backtraces on the build machine); the
# image does without it (~4x smaller). Symbols stay, so a panic's backtrace still names functions.
if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/recsys"; fi
cp "$ORT_LIB" "$root/opt/recsys/lib/"
cp -r models "$root/opt/recsys/models"
cp config/node.toml "$root/etc/recsys/node.toml"
copy_libs "$BIN"
copy_libs "$ORT_LIB"
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || [ "$(uname -m)" != x86_64 ] \
  || die "ldd did not name the dynamic loader /lib64/ld-linux-x86-64.so.2"
printf 'root:x:0:0:root:/root:/sbin/nologin\nrecsys:x:%s:%s:recsys node:/data:/sbin/nologin\n' \
  "$UID_GID" "$UID_GID" >"$root/etc/passwd"
printf 'root:x:0:\nrecsys:x:%s:\n' "$UID_GID" >"$root/etc/group"
mkdir -p "$root/tmp"
chmod 1777 "$root/tmp"
# Readable by the node's user whatever this checkout's umask was.
chmod -R a+rX "$root"

echo "$ME: staged $(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1), in $CTX:"
find "$root" -type f -printf '  /%P\n' | sort
if [ "${STAGE_ONLY:-0}" = 1 ]; then
  echo "$CTX"
  exit 0
fi
command -v docker >/dev/null || die "docker (the client) not found"
docker build --file Dockerfile --tag "$IMAGE" "$CTX"
echo "$ME: built $IMAGE"
