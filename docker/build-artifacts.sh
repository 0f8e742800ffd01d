#!/usr/bin/env bash
# Builds and checks the image's file tree; the Dockerfile only copies the result. CI runs it natively.
#
#   docker/build-artifacts.sh [--arch amd64|arm64] [--out DIR]     (defaults: this machine, target/image-root)
#
# The tree:
#   /usr/bin/vgpu-device-plugin              the node agent
#   /usr/bin/vgpu-install-hook               the init container's installer (docker/install-hook.sh)
#   /k8s-vgpu/lib/nvidia/libvgpu.so          the limiter (the Go plugin's image has it at the same path)
#   /k8s-vgpu/lib/nvidia/ld.so.preload       one line: /usr/local/vgpu/libvgpu.so (the path in containers)
#
# Both binaries are built with cargo-zigbuild against glibc 2.17: libvgpu.so is loaded into every process of
# every GPU container (CentOS 7 / Ubuntu 18.04+ images included), and the agent then runs on any base image.
# libvgpu.so is then edited to need only libc.so.6 and the loader (limiter/elf-unneed, as build-portable.sh does).
# zig and cargo-zigbuild come from PyPI into target/zig-venv when missing (as limiter/build-portable.sh does).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

GLIBC="2.17"
arch=""
out="$ROOT/target/image-root"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--arch amd64|arm64] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$arch" ]; then
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) echo "error: unsupported machine $(uname -m); pass --arch amd64|arm64" >&2; exit 2 ;;
  esac
fi
case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-gnu ;;
  *) echo "error: --arch must be amd64 or arm64 (Docker's TARGETARCH), not '$arch'" >&2; exit 2 ;;
esac

# zig + cargo-zigbuild, from PATH or target/zig-venv.
if ! { command -v cargo-zigbuild >/dev/null && { command -v zig >/dev/null || python3 -c 'import ziglang' 2>/dev/null; }; }; then
  venv="$ROOT/target/zig-venv"
  if [ ! -x "$venv/bin/cargo-zigbuild" ]; then
    if [ "${VGPU_NO_PIP:-0}" = "1" ]; then
      echo "error: cargo-zigbuild is missing and VGPU_NO_PIP=1" >&2
      exit 1
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q ziglang cargo-zigbuild
  fi
  export PATH="$venv/bin:$PATH"
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
  rustup target add "$triple"
fi

echo "== building vgpu-device-plugin and libvgpu.so for $arch ($triple, glibc $GLIBC)"
cargo zigbuild --locked --release -p vgpu-device-plugin -p vgpu-limiter --target "$triple.$GLIBC"
bin="target/$triple/release"
# libvgpu.so stops needing libpthread.so.0 and libdl.so.2 (limiter/elf-unneed; see limiter/build-portable.sh).
cargo run --locked --release -q -p vgpu-elf-unneed -- "$bin/libvgpu.so"

echo "== assembling $out"
rm -rf "$out"
install -D -m 0755 "$bin/vgpu-device-plugin" "$out/usr/bin/vgpu-device-plugin"
install -D -m 0755 docker/install-hook.sh "$out/usr/bin/vgpu-install-hook"
install -D -m 0644 "$bin/libvgpu.so" "$out/k8s-vgpu/lib/nvidia/libvgpu.so"
printf '/usr/local/vgpu/libvgpu.so\n' >"$out/k8s-vgpu/lib/nvidia/ld.so.preload"
chmod 0644 "$out/k8s-vgpu/lib/nvidia/ld.so.preload"

echo "== checking $out"
expected="k8s-vgpu/lib/nvidia/ld.so.preload
k8s-vgpu/lib/nvidia/libvgpu.so
usr/bin/vgpu-device-plugin
usr/bin/vgpu-install-hook"
actual="$(cd "$out" && find . -type f | sed 's|^\./||' | LC_ALL=C sort)"
if [ "$actual" != "$expected" ]; then
  echo "error: unexpected image tree:" >&2
  echo "$actual" >&2
  exit 1
fi
# glibc versions and exports of the limiter (the limiter's own check), and glibc of the agent.
limiter/build-portable.sh --check "$out/k8s-vgpu/lib/nvidia/libvgpu.so"
agent_glibc="$(objdump -T "$out/usr/bin/vgpu-device-plugin" | awk '$0 ~ /\*UND\*/' | grep -o 'GLIBC_[0-9][0-9.]*' |
  sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n | tail -n1)"
echo "$out/usr/bin/vgpu-device-plugin needs glibc ${agent_glibc:-<none>} (limit $GLIBC)"
if [ -n "$agent_glibc" ] && [ "$(printf '%s\n%s\n' "$GLIBC" "$agent_glibc" | sort -t. -k1,1n -k2,2n | tail -n1)" != "$GLIBC" ]; then
  echo "error: the agent needs GLIBC_$agent_glibc > GLIBC_$GLIBC" >&2
  exit 1
fi
if [ "$arch" = "$(case "$(uname -m)" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; esac)" ]; then
  # The agent runs, and says which version it is.
  "$out/usr/bin/vgpu-device-plugin" --version
  # The installer: installs, leaves identical files alone, replaces a changed file by rename (new inode).
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  sh "$out/usr/bin/vgpu-install-hook" "$out/k8s-vgpu/lib/nvidia" "$scratch/hook" >/dev/null
  cmp "$out/k8s-vgpu/lib/nvidia/libvgpu.so" "$scratch/hook/libvgpu.so"
  [ "$(cat "$scratch/hook/ld.so.preload")" = "/usr/local/vgpu/libvgpu.so" ]
  before="$(stat -c %i "$scratch/hook/libvgpu.so")"
  said="$(sh "$out/usr/bin/vgpu-install-hook" "$out/k8s-vgpu/lib/nvidia" "$scratch/hook")"
  case "$said" in *"libvgpu.so: up to date"*) ;; *) echo "error: installer rewrote an identical file: $said" >&2; exit 1 ;; esac
  [ "$(stat -c %i "$scratch/hook/libvgpu.so")" = "$before" ]
  printf 'old' >"$scratch/hook/.held" && ln -f "$scratch/hook/libvgpu.so" "$scratch/hook/.held"
  printf 'stale' >>"$scratch/hook/libvgpu.so"
  said="$(sh "$out/usr/bin/vgpu-install-hook" "$out/k8s-vgpu/lib/nvidia" "$scratch/hook")"
  case "$said" in *"libvgpu.so: installed"*) ;; *) echo "error: installer kept a changed file: $said" >&2; exit 1 ;; esac
  cmp "$out/k8s-vgpu/lib/nvidia/libvgpu.so" "$scratch/hook/libvgpu.so"
  # The old inode (what a running container has mapped) was not rewritten.
  [ "$(tail -c 5 "$scratch/hook/.held")" = "stale" ]
  echo "installer: installs, idempotent, replaces by rename"
else
  echo "note: $arch binaries not executed on $(uname -m)"
fi
echo "image tree ready: $out"
