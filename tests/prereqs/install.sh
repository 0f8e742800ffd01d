#!/usr/bin/env bash
# Installs what the test suite needs besides Rust, and says nothing when it is all there:
# - the Debian packages of tests/prereqs/apt.txt: installed with apt-get when run as root; otherwise the exact
#   command is printed and the script fails (it never asks for a password itself);
# - the pinned PyPI packages of tests/prereqs/requirements.txt, into the venv target/test-venv (tests find
#   the interpreter at <workspace>/target/test-venv/bin/python); the venv is rebuilt only when the file changes.
# Exit status 0 means every prerequisite is present.
set -euo pipefail
cd "$(dirname "$0")/../.."

prereqs=tests/prereqs
venv=target/test-venv

# The names in a list file: `#` starts a comment, blank lines are skipped, one name (or pin) per line.
names() {
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$1" | grep -v '^$' || true
}

mapfile -t wanted < <(names "$prereqs/apt.txt")
mapfile -t pins < <(names "$prereqs/requirements.txt")
if [ "${#pins[@]}" -gt 0 ]; then
  # Debian's python3 has no venv module without this package.
  wanted+=(python3 python3-venv)
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "tests/prereqs/install.sh: this is not a Debian/Ubuntu system (no dpkg-query); install the equivalents of" >&2
  echo "  ${wanted[*]}" >&2
  echo "with your package manager, then run tests/run again" >&2
  exit 1
fi

# One dpkg-query for every package (fast when all is there); a package dpkg has never heard of prints nothing.
installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${wanted[@]}" 2>/dev/null | awk '$4 == "installed" { print $1 }' || true)
missing=()
for package in "${wanted[@]}"; do
  if ! grep -qx -- "$package" <<<"$installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  command=(apt-get install -y --no-install-recommends "${missing[@]}")
  if [ "$(id -u)" != 0 ]; then
    echo "The tests need Debian packages that are not installed: ${missing[*]}" >&2
    echo "Install them, then run tests/run again:" >&2
    echo "  sudo apt-get update && sudo ${command[*]}" >&2
    exit 1
  fi
  echo "installing the tests' Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive "${command[@]}" -qq >/dev/null; then
    echo "tests/prereqs/install.sh: ${command[*]} failed (output above)" >&2
    exit 1
  fi
fi

if [ "${#pins[@]}" -gt 0 ]; then
  # The venv is current when it was made from exactly this requirements file.
  stamp="$venv/.requirements.sha256"
  want=$(sha256sum "$prereqs/requirements.txt" | cut -d' ' -f1)
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "installing the tests' PyPI packages into $venv: ${pins[*]}" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-virtualenv -r "$prereqs/requirements.txt"
    echo "$want" >"$stamp"
  fi
fi
