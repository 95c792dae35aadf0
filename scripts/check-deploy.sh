#!/usr/bin/env bash
# Checks the deployment artifacts that cannot run here: every shell script (shellcheck), the host
# image template (packer validate and fmt), the host-service unit (systemd-analyze verify), and the
# compose file (compose config, and that its engine applies the local stack's migrations and
# metadata). Needs the workspace built (the unit and the template name the host-service binary).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
host_binary="$target_dir/debug/host-service"

for tool in shellcheck packer systemd-analyze; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: sudo apt-get install -y ${tool/systemd-analyze/systemd}" >&2
    exit 1
  }
done
[ -x "$host_binary" ] || { echo "$host_binary is missing: cargo build -p host-service" >&2; exit 1; }

echo "shellcheck"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck "${scripts[@]}"

echo "packer validate deploy/packer/host-ami.pkr.hcl"
# No update check: nothing here may reach the network.
export CHECKPOINT_DISABLE=1
packer validate -var "host_service_binary=$host_binary" deploy/packer/host-ami.pkr.hcl
packer fmt -check deploy/packer/host-ami.pkr.hcl

echo "systemd-analyze verify host-service.service"
unit_dir="$(mktemp -d)"
trap 'rm -rf "$unit_dir"' EXIT
# The unit names the path the image installs the binary at; point it at this build's.
sed "s#/usr/local/bin/host-service#$host_binary#" deploy/packer/files/host-service.service \
  > "$unit_dir/host-service.service"
# It warns on stderr for problems it only ignores: any output is a failure.
verify_output="$(systemd-analyze verify "$unit_dir/host-service.service" 2>&1)" || {
  echo "$verify_output" >&2
  exit 1
}
if [ -n "$verify_output" ]; then
  echo "$verify_output" >&2
  exit 1
fi

echo "compose config deploy/docker-compose.yml"
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=(docker-compose)
fi
config="$("${compose[@]}" -f deploy/docker-compose.yml config)"
for mount in "$repo/deploy/hasura/migrations:/hasura-migrations" \
             "$repo/deploy/hasura/metadata:/hasura-metadata" \
             "$repo/deploy/hasura/seeds/default:/seeds/default"; do
  grep -qF -- "$mount" <<<"$config" || {
    echo "deploy/docker-compose.yml does not mount $mount (the local stack's files)" >&2
    exit 1
  }
done
# Hasura's plain /healthz answers 200 with inconsistent metadata; only the strict form fails then.
grep -qF 'healthz?strict=true' <<<"$config" || {
  echo "deploy/docker-compose.yml: the hasura healthcheck must use /healthz?strict=true" >&2
  exit 1
}
# The Hasura CLI project (deploy/hasura/config.yaml) talks to compose's engine.
default="$(grep -oE 'HASURA_ADMIN_SECRET:-[^}]+' deploy/docker-compose.yml | sort -u)"
[ "$(wc -l <<<"$default")" = 1 ] || {
  echo "deploy/docker-compose.yml names several default admin secrets: $default" >&2
  exit 1
}
default="${default#HASURA_ADMIN_SECRET:-}"
cli="$(sed -nE 's/^admin_secret:[[:space:]]*//p' deploy/hasura/config.yaml)"
[ "$cli" = "$default" ] || {
  echo "deploy/hasura/config.yaml: admin_secret '$cli' is not compose's default '$default'" >&2
  exit 1
}
echo "deployment artifacts check out"
