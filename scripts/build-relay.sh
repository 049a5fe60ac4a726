#!/usr/bin/env bash
# Build vigil-relay, the static program a task with egress runs in its container
# (services/executor/relay/vigil-relay.c; docs/decisions/0013), cached by the hash of its
# source, and print the path of the binary. Needs gcc and libc6-dev (setup-host.sh
# installs them); static, so it runs in any agent image, whatever its libc.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

src="$VIGIL_ROOT/services/executor/relay/vigil-relay.c"
hash="$(sha256sum "$src" | cut -c1-16)"
bin="$VIGIL_CACHE/relay/vigil-relay-$hash"
if [ ! -x "$bin" ]; then
  say "building vigil-relay ($hash)"
  "${SUDO[@]}" mkdir -p "$VIGIL_CACHE/relay"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  gcc -O2 -static -Wall -Wextra -Werror -o "$tmp/vigil-relay" "$src"
  "$tmp/vigil-relay" --version >/dev/null || die "the vigil-relay just built does not run"
  "${SUDO[@]}" install -m 0755 "$tmp/vigil-relay" "$bin"
fi
echo "$bin"
