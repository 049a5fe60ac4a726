# Shared helpers for Vigil's setup scripts (sourced, not executed).
# shellcheck shell=bash

VIGIL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VIGIL_CACHE="${VIGIL_CACHE:-/var/cache/vigil}"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi

# Rootless Podman runs as an unprivileged user: `vigil` when we are root, else ourselves.
if [ "$(id -u)" -eq 0 ]; then
  PODMAN_USER="${VIGIL_PODMAN_USER:-vigil}"
else
  PODMAN_USER="$(id -un)"
fi

# Run a command as the Podman user, with the environment rootless Podman needs.
as_podman_user() {
  local uid home
  uid="$(id -u "$PODMAN_USER")"
  home="$(getent passwd "$PODMAN_USER" | cut -d: -f6)"
  if [ "$(id -u)" -eq "$uid" ]; then
    XDG_RUNTIME_DIR="$(podman_runtime_dir)" "$@"
  else
    "${SUDO[@]}" runuser -u "$PODMAN_USER" -- env -i HOME="$home" USER="$PODMAN_USER" \
      PATH=/usr/local/bin:/usr/bin:/bin XDG_RUNTIME_DIR="$(podman_runtime_dir)" "$@"
  fi
}

# Without systemd-logind there is no /run/user/<uid>; use a private directory of our own.
podman_runtime_dir() {
  local uid
  uid="$(id -u "$PODMAN_USER")"
  if [ -d "/run/user/$uid" ] && [ -O "/run/user/$uid" -o "$(id -u)" -eq 0 ]; then
    echo "/run/user/$uid"
  else
    echo "/tmp/vigil-runtime-$uid"
  fi
}
