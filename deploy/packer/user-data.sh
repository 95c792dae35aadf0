#!/bin/bash
# First-boot user data of a host (the scaling-service's --user-data-file). cloud-init runs it once
# as root. It writes the host-service's settings and starts it; the host identity (instance id,
# region, type, image, address) comes from the instance metadata service, not from here.
#
# Fill in the values of your deployment before handing the file to the scaling-service; keep the
# file out of version control once it holds the admin secret.
set -euo pipefail

install -d -m 0700 /etc/whist
umask 077
cat > /etc/whist/host-service.env <<'SETTINGS'
APP_ENV=prod
HASURA_URL=https://hasura.example.com/v1/graphql
HASURA_ADMIN_SECRET=replace-me
WHIST_AUTH_ISSUER=https://auth.example.com/
WHIST_AUTH_AUDIENCE=https://api.fractal.co
WHIST_MANDELBOX_IMAGE=browsers/whistium:current-build
GPU=true
RUST_LOG=info
LOG_FORMAT=json
SETTINGS

systemctl enable --now host-service.service
