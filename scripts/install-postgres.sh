#!/usr/bin/env bash
# Makes sure PostgreSQL 15's server binaries are installed (the local stack runs a throwaway
# cluster with them). Installs them with apt when run as root; otherwise says what to run.
set -euo pipefail

bin="${WHIST_PG_BIN:-/usr/lib/postgresql/15/bin}"
if [ -x "$bin/postgres" ] && [ -x "$bin/initdb" ] && [ -x "$bin/psql" ]; then
  exit 0
fi
packages=(postgresql-15 postgresql-client-15)
if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL 15 is not installed (looked in $bin). Install it with:" >&2
  echo "  sudo apt-get install -y ${packages[*]}" >&2
  exit 1
fi
echo "installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
