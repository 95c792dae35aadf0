#!/usr/bin/env bash
# Installs the Hasura-dialect GraphQL engine (postrust-server) used by the local stack and the tests,
# once per machine, into a cache directory outside the repository. Prints the binary's path.
#
# Hasura itself cannot be installed on the development machines; postrust speaks its GraphQL
# dialect over the same Postgres (see docs/ARCHITECTURE.md).
set -euo pipefail

version="3.1.0"
cache="${WHIST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/whist-fleet}"
root="$cache/postrust-$version"
bin="$root/bin/postrust"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

echo "installing postrust-server $version into $root (once per machine, several minutes)" >&2
mkdir -p "$cache"
# A private target directory keeps this build from locking or bloating the workspace's target/.
CARGO_TARGET_DIR="$cache/postrust-build" \
  cargo install postrust-server --version "$version" --features graphql --root "$root" >&2
rm -rf "$cache/postrust-build"
echo "$bin"
