#!/usr/bin/env bash
# Builds the reference mandelbox (crates/reference-mandelbox) as a static binary and imports it
# into the local Docker daemon as a one-file image, without a registry or a base image.
# Prints the image name as its last line on stdout; everything else goes to stderr.
#
# Usage: scripts/build-reference-mandelbox.sh [IMAGE]   (default whist/reference-mandelbox:current-build)
#
# Quick when nothing changed: the binary's sha256 is stored as an image label and the import is
# skipped when the existing image carries the same one.
set -euo pipefail

image="${1:-whist/reference-mandelbox:current-build}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
triple="x86_64-unknown-linux-gnu"
bin="$target_dir/$triple/release/reference-mandelbox"

# An explicit --target keeps RUSTFLAGS away from host builds (and their cache) in the same
# target directory; crt-static makes the binary run in an image with no libc at all.
# CARGO_ENCODED_RUSTFLAGS, if inherited (e.g. from a cargo-run parent), would override RUSTFLAGS.
(
  cd "$repo"
  unset CARGO_ENCODED_RUSTFLAGS
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release -p reference-mandelbox --target "$triple"
) >&2

sha="$(sha256sum "$bin" | cut -d' ' -f1)"
existing="$(docker image inspect --format '{{ index .Config.Labels "whist.binary-sha256" }}' \
  "$image" 2>/dev/null || true)"
if [ "$existing" = "$sha" ]; then
  echo "$image is up to date (binary sha256 $sha)" >&2
  echo "$image"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/whist/resourceMappings" "$root/tmp" "$root/var/log/whist" "$root/run"
chmod 1777 "$root/tmp"
install -m 0755 "$bin" "$root/reference-mandelbox"
tar --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/rootfs.tar" .

echo "importing $image (binary sha256 $sha)" >&2
docker import \
  --change 'ENTRYPOINT ["/reference-mandelbox"]' \
  --change 'LABEL whist.reference-mandelbox=1' \
  --change "LABEL whist.binary-sha256=$sha" \
  "$work/rootfs.tar" "$image" >&2
echo "$image"
