#!/usr/bin/env bash
# Validates every manifest under volcano-config/ offline against the Kubernetes OpenAPI schemas of the
# oldest and newest Kubernetes versions we support, strictly (unknown fields are errors).
#
#   volcano-config/validate.sh
#
# Supported range:
#   1.26  the oldest kubelet whose device-plugin client the agent's gRPC server accepts (older kubelets send
#         the socket path as the HTTP/2 :authority, which is refused with PROTOCOL_ERROR; see the README)
#   1.37  the newest schemas bundled by kubernetes-validate 1.37.0 (pinned below, so results never drift)
#
# Installs kubernetes-validate from PyPI into target/kubernetes-validate-venv when it is not there
# (idempotent); VGPU_NO_PIP=1 forbids that and then fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

VALIDATOR_VERSION="1.37.0"
VERSIONS=("1.26.0" "1.37.0")
VENV="$ROOT/target/kubernetes-validate-venv"
BIN="$VENV/bin/kubernetes-validate"

if [ ! -x "$BIN" ] || [ "$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null | awk '/^Version:/{print $2}')" != "$VALIDATOR_VERSION" ]; then
  if [ "${VGPU_NO_PIP:-0}" = "1" ]; then
    echo "error: kubernetes-validate $VALIDATOR_VERSION is not in $VENV and VGPU_NO_PIP=1" >&2
    exit 1
  fi
  echo "installing kubernetes-validate $VALIDATOR_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$VALIDATOR_VERSION"
fi

mapfile -t FILES < <(find volcano-config -name '*.yaml' | sort)
if [ "${#FILES[@]}" -eq 0 ]; then
  echo "error: no manifests found under volcano-config/" >&2
  exit 1
fi

# Both DaemonSets must be among them (the MIG one is a separate file an operator applies on MIG nodes).
for required in volcano-config/vgpu-device-plugin.yaml volcano-config/vgpu-device-plugin-mig.yaml; do
  if ! printf '%s\n' "${FILES[@]}" | grep -qx "$required"; then
    echo "error: $required is missing" >&2
    exit 1
  fi
done

# The validator must still reject a broken manifest (a wrong type and an unknown field), so a silently
# permissive install can never pass everything.
bad="$(mktemp --suffix=.yaml)"
trap 'rm -f "$bad"' EXIT
printf 'apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\nspec:\n  containers:\n  - name: a\n    image: b\n    imagePullPolicy: 3\n    bogus: 1\n' >"$bad"

status=0
for version in "${VERSIONS[@]}"; do
  if "$BIN" --strict --quiet -k "$version" "$bad" >/dev/null 2>&1; then
    echo "error: kubernetes-validate accepted a broken manifest for $version; the check is not working" >&2
    exit 1
  fi
  if "$BIN" --strict --quiet -k "$version" "${FILES[@]}"; then
    echo "Kubernetes $version: ${#FILES[@]} files valid (strict)"
  else
    echo "error: manifests do not validate against Kubernetes $version" >&2
    status=1
  fi
done
exit "$status"
