#!/usr/bin/env bash
# Builds the shipped libvgpu.so against glibc 2.17 (CentOS 7, Ubuntu 18.04+, RHEL 8, Debian 10)
# with cargo-zigbuild, edits it so that it needs neither libpthread.so.0 nor libdl.so.2
# (limiter/elf-unneed: their imports become weak ones bound from libc.so.6 on glibc >= 2.34, where
# those two files are empty stubs that cost every exec ~40 us; on an older glibc they are bound
# when the process loaded them itself, and the library checks them before use:
# limiter/src/infra/imports.rs), then fails if the library needs any symbol version above
# GLIBC_2.17, still needs either file, or imports one of their functions strongly.
#
#   limiter/build-portable.sh            # build + check -> target/x86_64-unknown-linux-gnu/release/libvgpu.so
#   limiter/build-portable.sh --check F  # only check an existing library F
#
# Needs `zig` and `cargo-zigbuild` on PATH; if they are missing it installs them from PyPI
# (`pip install ziglang cargo-zigbuild`) into ./target/zig-venv. Set VGPU_NO_PIP=1 to forbid that:
# without zig the script then only reports the glibc version the host-built library needs.
set -euo pipefail

MAX_GLIBC="2.17"
TARGET="x86_64-unknown-linux-gnu"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# Prints the highest GLIBC_x.y version among the library's undefined (needed) dynamic symbols.
highest_glibc() {
  objdump -T "$1" | awk '$0 ~ /\*UND\*/' | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
    sort -t. -k1,1n -k2,2n -k3,3n | tail -n1
}

check() {
  local lib="$1" found
  found="$(highest_glibc "$lib")"
  echo "$lib needs glibc ${found:-<none>} (limit $MAX_GLIBC)"
  if [ -n "$found" ] && [ "$(printf '%s\n%s\n' "$MAX_GLIBC" "$found" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n1)" != "$MAX_GLIBC" ]; then
    echo "error: $lib requires GLIBC_$found > GLIBC_$MAX_GLIBC; these symbols are too new:" >&2
    objdump -T "$lib" | awk '$0 ~ /\*UND\*/' | grep -E "GLIBC_($found)[[:space:]]" >&2 || true
    return 1
  fi
  # Neither libpthread.so.0 nor libdl.so.2 (limiter/elf-unneed): DT_NEEDED is libc and the loader only,
  # every version need names one of them, and every import of a weak version need is a weak symbol.
  local needed
  needed="$(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | LC_ALL=C sort | tr '\n' ' ')"
  case "$needed" in
    "ld-linux-x86-64.so.2 libc.so.6 " | "ld-linux-aarch64.so.1 libc.so.6 " | "libc.so.6 ") ;;
    *) echo "error: $lib needs [$needed]; only libc.so.6 and the loader (was limiter/elf-unneed run?)" >&2; return 1 ;;
  esac
  local files
  files="$(readelf -V "$lib" | sed -n 's/.*File: \([^ ]*\).*/\1/p' | grep -Ev '^(libc\.so\.6|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$' || true)"
  if [ -n "$files" ]; then
    echo "error: $lib has version needs on $files" >&2
    return 1
  fi
  local weak_versions strong
  weak_versions="$(readelf -V "$lib" | sed -n 's/.*Flags: WEAK *Version: \([0-9]*\).*/\1/p' | tr '\n' ' ')"
  if [ -z "$weak_versions" ]; then
    echo "error: $lib has no weak version needs (was limiter/elf-unneed run?)" >&2
    return 1
  fi
  strong="$(readelf -W --dyn-syms "$lib" | awk -v w=" $weak_versions" '$7 == "UND" && $5 != "WEAK" {
      v = $NF; if (v ~ /^\([0-9]+\)$/) { gsub(/[()]/, "", v); if (index(w, " " v " ")) print $8 } }')"
  if [ -n "$strong" ]; then
    echo "error: $lib imports these strongly under a weak version need: $strong" >&2
    return 1
  fi
  # Imports the library calls without checking them first (limiter/src/infra/imports.rs): fork handlers go
  # through __register_atfork, and the unwinder's lock and dladdr are the library's own (infra/unwind_lock.rs).
  local unchecked
  unchecked="$(readelf -W --dyn-syms "$lib" | awk '$7 == "UND" { sub(/@.*/, "", $8); print $8 }' |
    grep -Ex 'pthread_atfork|pthread_rwlock_(rdlock|wrlock|unlock)|dladdr' || true)"
  if [ -n "$unchecked" ]; then
    echo "error: $lib imports" $unchecked "which may be NULL and are never checked" >&2
    return 1
  fi
  echo "$lib needs [${needed% }]; weak imports (formerly libpthread/libdl): $(readelf -W --dyn-syms "$lib" |
    awk -v w=" $weak_versions" '$7 == "UND" { v = $NF; if (v ~ /^\([0-9]+\)$/) { gsub(/[()]/, "", v); if (index(w, " " v " ")) printf "%s ", $8 } }')"
  # Only CUDA/NVML entry points and dlsym may be exported.
  local extra
  extra="$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -Ev '^(cu|nvml)[A-Za-z0-9_]+$|^dlsym$' || true)"
  if [ -n "$extra" ]; then
    echo "error: unexpected exported symbols:" >&2
    echo "$extra" >&2
    return 1
  fi
}

if [ "${1:-}" = "--check" ]; then
  check "$2"
  exit
fi

if command -v cargo-zigbuild >/dev/null && { command -v zig >/dev/null || python3 -c 'import ziglang' 2>/dev/null; }; then
  :
else
  venv="$ROOT/target/zig-venv"
  if [ -x "$venv/bin/cargo-zigbuild" ]; then
    export PATH="$venv/bin:$PATH"
  elif [ "${VGPU_NO_PIP:-0}" != "1" ] && python3 -m venv "$venv" && "$venv/bin/pip" install -q ziglang cargo-zigbuild; then
    export PATH="$venv/bin:$PATH"
  else
    if [ "${CI:-}" = "true" ]; then
      echo "error: zig/cargo-zigbuild could not be installed; CI needs the portable build" >&2
      exit 1
    fi
    echo "warning: zig/cargo-zigbuild unavailable; building for the host glibc and reporting only" >&2
    cargo build --release -p vgpu-limiter
    lib="target/release/libvgpu.so"
    echo "$lib needs glibc $(highest_glibc "$lib") (host build; NOT portable to glibc $MAX_GLIBC)"
    exit 0
  fi
fi

cargo zigbuild --release -p vgpu-limiter --target "$TARGET.$MAX_GLIBC"
cargo run --release -q -p vgpu-elf-unneed -- "target/$TARGET/release/libvgpu.so"
check "target/$TARGET/release/libvgpu.so"
