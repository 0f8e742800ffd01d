#!/usr/bin/env bash
# The node in a real container engine, end to end (tests/sim-node/tests/containers.rs):
#
#   docker/e2e.sh            as root; VGPU_E2E=skip skips it (machines without root or without Docker)
#   VGPU_E2E_ARTIFACTS=target/image-root docker/e2e.sh    reuse a tree docker/build-artifacts.sh built
#
# 1. Installs what is missing: Debian's docker.io (dockerd, containerd, runc) and debootstrap.
# 2. Starts its own dockerd on a private socket, with no bridge and no iptables rules, its data root in
#    target/e2e/docker (so images survive between runs); stops it on exit, leaving nothing running.
# 3. Makes the base images with debootstrap (no registry is reachable): debian:bookworm-slim, the tag
#    docker/Dockerfile names, vgpu-e2e/workload:bookworm (plus python3) and vgpu-e2e/workload:bullseye
#    (glibc 2.31) for workload containers. Root file systems are cached as target/e2e/*.tar, so later runs
#    import them in seconds.
# 4. Builds the image from the shipped docker/Dockerfile, with the file tree docker/build-artifacts.sh
#    assembles (glibc-2.17 agent and libvgpu.so).
# 5. Runs the containerised node: the init container, the agent container as the DaemonSet describes it,
#    a Volcano bind and Allocate, then workload containers that get the limiter only through Allocate's
#    mounts (see tests/sim-node/src/containers.rs for every check).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ "${VGPU_E2E:-}" = "skip" ]; then
  echo "docker/e2e.sh: skipped (VGPU_E2E=skip)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: docker/e2e.sh starts its own dockerd and needs root; run it as root, or set VGPU_E2E=skip" >&2
  exit 1
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "error: docker/e2e.sh mounts the gpu-sim where the NVIDIA runtime puts x86_64 driver libraries; on $(uname -m) set VGPU_E2E=skip" >&2
  exit 1
fi

STATE="$ROOT/target/e2e"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
IMAGE="vgpu-node-agent:e2e"
WORKLOAD="vgpu-e2e/workload:bookworm"
OLD_GLIBC="vgpu-e2e/workload:bullseye"   # glibc 2.31, the oldest Debian release the mirror still serves
# nvidia-ml-py (NVIDIA's own NVML binding), at the version the client-library tests pin.
PYNVML_VERSION="$(sed -n 's/^nvidia-ml-py==\([^ ]*\).*/\1/p' tests/prereqs/requirements.txt)"
[ -n "$PYNVML_VERSION" ] || { echo "error: tests/prereqs/requirements.txt pins no nvidia-ml-py" >&2; exit 1; }
mkdir -p "$STATE"
started=$(date +%s)
step() { echo "== e2e [$(($(date +%s) - started)) s] $*"; }

step "packages: docker.io and debootstrap, when missing"
missing=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's client matches Debian's daemon (a newer client elsewhere on PATH may need buildx).
export DOCKER=/usr/bin/docker

step "dockerd on a private socket"
run_dir="$(mktemp -d /tmp/vgpu-e2e.XXXXXX)"
export DOCKER_HOST="unix://$run_dir/docker.sock"
dockerd_pid=""
cleanup() {
  local rc=$?
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    ids=$("$DOCKER" ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$dockerd_pid" 2>/dev/null || true
  fi
  # dockerd leaves its network-namespace bind mounts (exec/netns) behind; lazily unmount what is left.
  awk -v d="$run_dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$run_dir" 2>/dev/null || echo "warning: could not remove $run_dir" >&2
  exit "$rc"
}
trap cleanup EXIT
/usr/sbin/dockerd --host "$DOCKER_HOST" --data-root "$STATE/docker" --exec-root "$run_dir/exec" \
  --pidfile "$run_dir/dockerd.pid" --bridge=none --iptables=false --ip-masq=false \
  >"$STATE/dockerd.log" 2>&1 &
dockerd_pid=$!
for i in $(seq 1 300); do
  "$DOCKER" info >/dev/null 2>&1 && break
  if ! kill -0 "$dockerd_pid" 2>/dev/null || [ "$i" = 300 ]; then
    echo "error: dockerd did not start; its log ($STATE/dockerd.log):" >&2
    tail -20 "$STATE/dockerd.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "   dockerd $("$DOCKER" version -f '{{.Server.Version}}'), storage $("$DOCKER" info -f '{{.Driver}}')"

# base_image TAG SUITE [PACKAGES]: a minimal Debian root file system made by debootstrap, imported as TAG.
base_image() {
  local tag=$1 suite=$2 include=${3:-}
  if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
    echo "   $tag: present"
    return
  fi
  local tarball="$STATE/rootfs-${tag//[:\/]/-}.tar"
  if [ ! -s "$tarball" ]; then
    local dir="$STATE/rootfs-build"
    rm -rf "$dir"
    debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$dir" "$MIRROR" \
      >"$STATE/debootstrap.log" 2>&1 || {
      echo "error: debootstrap $suite from $MIRROR failed; its log:" >&2
      tail -20 "$STATE/debootstrap.log" >&2
      exit 1
    }
    # What a slim image leaves out: package lists, caches, documentation.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
      "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
    tar -C "$dir" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
  fi
  "$DOCKER" import "$tarball" "$tag" >/dev/null
  echo "   $tag: imported from $(basename "$tarball")"
}
step "base images (debootstrap, cached in $STATE)"
base_image debian:bookworm-slim bookworm
base_image "$WORKLOAD" bookworm python3
base_image "$OLD_GLIBC" bullseye

# VGPU_E2E_ARTIFACTS names a tree docker/build-artifacts.sh already built and checked (CI's, in the same run).
if [ -n "${VGPU_E2E_ARTIFACTS:-}" ]; then
  step "the image's file tree: $VGPU_E2E_ARTIFACTS (built by docker/build-artifacts.sh)"
  [ -x "$VGPU_E2E_ARTIFACTS/usr/bin/vgpu-device-plugin" ] || {
    echo "error: VGPU_E2E_ARTIFACTS=$VGPU_E2E_ARTIFACTS holds no image tree (run docker/build-artifacts.sh)" >&2
    exit 1
  }
  if [ "$(cd "$VGPU_E2E_ARTIFACTS" && pwd -P)" != "$ROOT/target/image-root-amd64" ]; then
    rm -rf "$ROOT/target/image-root-amd64"
    cp -a "$VGPU_E2E_ARTIFACTS" "$ROOT/target/image-root-amd64"
  fi
else
  step "the image's file tree (docker/build-artifacts.sh)"
  docker/build-artifacts.sh --arch amd64 --out "$ROOT/target/image-root-amd64"
fi

step "docker build -f docker/Dockerfile"
DOCKER_BUILDKIT=0 "$DOCKER" build -q --build-arg TARGETARCH=amd64 -f docker/Dockerfile -t "$IMAGE" . >/dev/null
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
echo "   $IMAGE: $((size / 1024 / 1024)) MiB ($size bytes)"

# The workloads' driver (the gpu-sim's libcuda.so.1 and libnvidia-ml.so.1) and the CUDA program, built for
# glibc 2.17 with zig like libvgpu.so, so they load in every workload image (the test build's need glibc 2.34).
step "the gpu-sim driver and the CUDA program for glibc 2.17 (zig cc)"
zig_venv="$ROOT/target/zig-venv"
if [ ! -x "$zig_venv/bin/python-zig" ]; then
  python3 -m venv "$zig_venv"
  "$zig_venv/bin/pip" install -q ziglang
fi
cat >"$STATE/zigcc" <<ZIGCC
#!/bin/sh
# zig cc for glibc 2.17. The cc crate's --target (a Rust triple zig does not parse) and gcc's -fno-ipa-icf
# are dropped; warnings stay warnings (clang's differ from gcc's, which the gpu-sim's own build enforces).
for a in "\$@"; do shift; case "\$a" in --target=*|-fno-ipa-icf) ;; *) set -- "\$@" "\$a" ;; esac; done
exec "$zig_venv/bin/python-zig" cc -target x86_64-linux-gnu.2.17 "\$@" -Wno-error
ZIGCC
chmod +x "$STATE/zigcc"
CC="$STATE/zigcc" cargo build -q --locked -p gpu-sim --target-dir "$STATE/sim-compat"
driver_dir="$(dirname "$(ls -t "$STATE"/sim-compat/debug/build/gpu-sim-*/out/lib/libcuda.so.1 | head -n 1)")"
echo "   $driver_dir"

step "nvidia-ml-py $PYNVML_VERSION for the workload's NVML client"
pynvml="$STATE/pynvml-$PYNVML_VERSION"
if [ ! -f "$pynvml/pynvml.py" ]; then
  rm -rf "$STATE/pip"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$STATE/pip" "nvidia-ml-py==$PYNVML_VERSION"
  mkdir -p "$pynvml.tmp"
  python3 -m zipfile -e "$STATE"/pip/nvidia_ml_py-*.whl "$pynvml.tmp"
  rm -rf "$pynvml"
  mv "$pynvml.tmp" "$pynvml"
fi

step "the containerised node (cargo test -p sim-node --test containers -- --ignored)"
VGPU_E2E_IMAGE="$IMAGE" VGPU_E2E_WORKLOAD_IMAGES="$WORKLOAD,$OLD_GLIBC" VGPU_E2E_PYNVML="$pynvml" \
  VGPU_E2E_DRIVER_DIR="$driver_dir" VGPU_E2E_CC="$STATE/zigcc" \
  cargo test -p sim-node --locked --test containers -- --ignored --test-threads=1 --nocapture

step "done"
