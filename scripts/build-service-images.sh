#!/usr/bin/env bash
# Build localhost/vigil-<service>:latest for the four services, for deploy/compose.
# Each image is the agent base rootfs (Debian + Python 3.11) plus the service and its
# dependencies installed with uv for that Python; no registry is involved.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
"$VIGIL_ROOT/scripts/build-agent-image.sh"   # the base rootfs image
UV="$(cat "$VIGIL_ROOT/.uv-path" 2>/dev/null || command -v uv)"
PY=/usr/bin/python3   # Debian's 3.11: the same interpreter as in the image
for svc in scheduler executor auditor gateway; do
  tmp="$(mktemp -d)"
  cp "$VIGIL_ROOT/services/$svc/Containerfile" "$tmp/"
  if [ "$svc" = executor ]; then
    # The egress relay, where VIGIL_EGRESS_RELAY looks by default (docs/decisions/0013).
    cp "$("$VIGIL_ROOT/scripts/build-relay.sh")" "$tmp/vigil-relay"
  fi
  say "installing vigil-$svc for $($PY --version)"
  (cd "$VIGIL_ROOT" && "$UV" export --frozen --no-dev --no-emit-workspace --package "vigil-$svc" \
      --no-hashes -q > "$tmp/requirements.txt")
  # Wheels, not paths: a path would be installed editable (the workspace source), which
  # would point outside the image.
  (cd "$VIGIL_ROOT" && "$UV" build -q --wheel --package vigil -o "$tmp/dist" &&
      "$UV" build -q --wheel --package "vigil-$svc" -o "$tmp/dist")
  "$UV" pip install -q --python "$PY" --target "$tmp/site" -r "$tmp/requirements.txt" \
      "$tmp"/dist/*.whl
  chmod -R a+rX "$tmp"
  say "building localhost/vigil-$svc:latest"
  as_podman_user podman build --quiet -t "localhost/vigil-$svc:latest" "$tmp" >/dev/null
  rm -rf "$tmp"
done
tmp="$(mktemp -d)"
cp "$VIGIL_ROOT/deploy/compose/nats.Containerfile" "$tmp/Containerfile"
cp "$VIGIL_ROOT/.venv/bin/nats-server" "$tmp/nats-server"
chmod -R a+rX "$tmp"
say "building localhost/vigil-nats:latest"
as_podman_user podman build --quiet -t localhost/vigil-nats:latest "$tmp" >/dev/null
rm -rf "$tmp"
say "built the service images and localhost/vigil-nats:latest"
