#!/usr/bin/env bash
# Builds the scaling-service container image on this machine without a registry: compiles a
# static binary, stages it with the CA bundle, and packages it with deploy/heroku/prebuilt.Dockerfile.
# Prints the image name as its last line on stdout; everything else goes to stderr.
#
# Usage: scripts/build-scaling-image.sh [IMAGE]   (default whist/scaling-service:local)
#   WHIST_IMAGE_PROFILE=dev  builds an unoptimised binary (quicker; the image test uses it)
set -euo pipefail

image="${1:-whist/scaling-service:local}"
profile="${WHIST_IMAGE_PROFILE:-release}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
triple="x86_64-unknown-linux-gnu"
case "$profile" in
  dev) out_dir="debug" ;;
  *) out_dir="$profile" ;;
esac
ca_bundle="/etc/ssl/certs/ca-certificates.crt"
[ -f "$ca_bundle" ] || { echo "no CA bundle at $ca_bundle (install ca-certificates)" >&2; exit 1; }

# An explicit --target keeps RUSTFLAGS away from build scripts and proc macros, which cannot be
# static; crt-static links glibc in, so the binary runs on an empty base image.
(
  cd "$repo"
  unset CARGO_ENCODED_RUSTFLAGS
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --profile "$profile" -p scaling-service --bin scaling-service --target "$triple"
) >&2

context="$target_dir/scaling-image"
rm -rf "$context"
mkdir -p "$context/rootfs/etc/ssl/certs"
install -m 0755 "$target_dir/$triple/$out_dir/scaling-service" "$context/rootfs/scaling-service"
install -m 0644 "$ca_bundle" "$context/rootfs/etc/ssl/certs/ca-certificates.crt"

echo "building $image ($profile binary)" >&2
DOCKER_BUILDKIT=0 docker build --quiet -f "$repo/deploy/heroku/prebuilt.Dockerfile" -t "$image" "$context" >&2
echo "$image"
