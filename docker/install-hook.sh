#!/bin/sh
# vgpu-install-hook SRC DEST: installs libvgpu.so and ld.so.preload from SRC (in the image) into DEST (the
# host hook path, /usr/local/vgpu), as the DaemonSet's init container.
#
# Each file is copied beside its target and renamed over it: GPU containers that are running keep the
# library they have mapped (their bind mount holds the old inode); overwriting it in place would crash
# them. A file that is already identical is left alone, so restarts change nothing. libvgpu.so goes first,
# so ld.so.preload never names a library that is not there yet.
set -eu

if [ "$#" -ne 2 ]; then
  echo "usage: vgpu-install-hook SRC_DIR DEST_DIR" >&2
  exit 2
fi
src=$1
dest=$2

mkdir -p "$dest"
tmp=""
trap 'if [ -n "$tmp" ]; then rm -f "$tmp"; fi' EXIT

for name in libvgpu.so ld.so.preload; do
  if [ ! -f "$src/$name" ]; then
    echo "error: $src/$name is missing (a broken image?)" >&2
    exit 1
  fi
  if [ -f "$dest/$name" ] && cmp -s "$src/$name" "$dest/$name"; then
    echo "$dest/$name: up to date"
    continue
  fi
  tmp="$dest/.$name.new.$$"
  cp "$src/$name" "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$dest/$name"
  tmp=""
  echo "$dest/$name: installed"
done
