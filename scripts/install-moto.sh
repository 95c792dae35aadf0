#!/usr/bin/env bash
# Installs moto's server (a local stand-in for the EC2 API, used by the scaling-service tests)
# once per machine into a virtualenv in a cache directory outside the repository. Prints the
# `moto_server` path.
set -euo pipefail

version="5.2.5"
cache="${WHIST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/whist-fleet}"
root="$cache/moto-$version"
bin="$root/bin/moto_server"

if [ -x "$bin" ] && [ -f "$root/.installed" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
# Test processes may run this at the same time: one installs, the others wait and reuse it.
exec 9>"$cache/moto-$version.lock"
flock 9
if [ -x "$bin" ] && [ -f "$root/.installed" ]; then
  echo "$bin"
  exit 0
fi

echo "installing moto[server] $version into $root (once per machine)" >&2
# A half-finished earlier attempt leaves a venv without the marker: start over.
rm -rf "$root"
python3 -m venv "$root" >&2
"$root/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$version" >&2
touch "$root/.installed"
echo "$bin"
