#!/usr/bin/env bash
# Build the default agent image without a registry, and cache every slow step:
#   1. a Debian rootfs with Python 3 (mmdebstrap, ~20 s)  -> $VIGIL_CACHE/rootfs-*.tar
#   2. `podman import` of it as localhost/vigil-agent-base:bookworm (~4 s)
#   3. `podman build` of images/agent on top, tagged by the hash of its files.
# A second run with nothing changed only checks that the tagged image exists.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROOTFS_VERSION=1   # bump to rebuild the rootfs (e.g. to add a package)
BASE_IMAGE="localhost/vigil-agent-base:bookworm-$ROOTFS_VERSION"
IMAGE="${VIGIL_AGENT_IMAGE:-localhost/vigil-agent:latest}"
ctx="$VIGIL_ROOT/images/agent"
# The example agent (examples/chat-agent) ships in the image, so the README can run it.
example="$VIGIL_ROOT/examples/chat-agent/chat_agent.py"
hash="$( (cd "$ctx" && sha256sum Containerfile ./*.py; sha256sum <"$example") \
        | sha256sum | cut -c1-16)"
HASHED="localhost/vigil-agent:$hash"

if as_podman_user podman image exists "$HASHED"; then
  as_podman_user podman tag "$HASHED" "$IMAGE"
  exit 0
fi

# The rootfs comes from Debian's archive (deb.debian.org, bookworm), which apt on a Debian
# host trusts already. Elsewhere (Ubuntu) apt trusts only its own archive: name Debian's
# keyring, from the debian-archive-keyring package (setup-host.sh installs it).
debian_keyring() {
  [ "$(. /etc/os-release 2>/dev/null && echo "${ID:-}")" != debian ] || return 0
  local k
  for k in /usr/share/keyrings/debian-archive-keyring.gpg \
           /usr/share/keyrings/debian-archive-keyring.pgp; do
    if [ -s "$k" ]; then echo "--keyring=$k"; return 0; fi
  done
  die "Debian's archive keyring is missing: apt-get install debian-archive-keyring"
}

if ! as_podman_user podman image exists "$BASE_IMAGE"; then
  tar="$VIGIL_CACHE/rootfs-bookworm-python3-v$ROOTFS_VERSION.tar"
  if [ ! -s "$tar" ]; then
    say "building a Debian rootfs with Python 3 (mmdebstrap, about 20 s)"
    "${SUDO[@]}" mkdir -p "$VIGIL_CACHE"
    keyring="$(debian_keyring)"
    "${SUDO[@]}" mmdebstrap --quiet --format=tar --variant=essential --include=python3 \
      ${keyring:+"$keyring"} \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      bookworm "$tar.tmp"
    "${SUDO[@]}" mv "$tar.tmp" "$tar"
  fi
  say "importing the rootfs as $BASE_IMAGE"
  "${SUDO[@]}" chmod 0644 "$tar"
  as_podman_user podman import --quiet "$tar" "$BASE_IMAGE" >/dev/null
fi

say "building $IMAGE ($hash)"
# The build context must be readable by the Podman user: copy it somewhere it can read.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$ctx"/Containerfile "$ctx"/*.py "$example" "$tmp"/
chmod -R a+rX "$tmp"
as_podman_user podman build --quiet --build-arg "BASE=$BASE_IMAGE" \
  --label "dev.vigil.image-hash=$hash" -t "$HASHED" -t "$IMAGE" "$tmp" >/dev/null
say "built $IMAGE"
