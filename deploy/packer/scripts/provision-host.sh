#!/usr/bin/env bash
# Runs once on the image builder as root: Docker, the NVIDIA driver and container toolkit, the
# host-service binary and unit, and the directories the agent uses.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

: "${NVIDIA_DRIVER_PACKAGE:?set by the packer template}"
MANDELBOX_IMAGES="${MANDELBOX_IMAGES:-}"

apt-get update -q
apt-get install -y -q --no-install-recommends ca-certificates curl gnupg apparmor

# Docker Engine from Ubuntu's archive (the agent speaks the engine API; no CLI plugins needed).
apt-get install -y -q --no-install-recommends docker.io
systemctl enable docker.service

# The GPU driver, then NVIDIA's container toolkit as Docker's default runtime, so a mandelbox's
# NVIDIA_VISIBLE_DEVICES gives it exactly its GPU.
apt-get install -y -q --no-install-recommends "$NVIDIA_DRIVER_PACKAGE"
keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor -o "$keyring"
curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
  | sed "s#deb https://#deb [signed-by=$keyring] https://#g" \
  > /etc/apt/sources.list.d/nvidia-container-toolkit.list
apt-get update -q
apt-get install -y -q --no-install-recommends nvidia-container-toolkit
nvidia-ctk runtime configure --runtime=docker --set-as-default
systemctl restart docker.service

# uinput for the mandelboxes' virtual input devices.
echo uinput > /etc/modules-load.d/uinput.conf

# The agent, its unit (enabled by the first-boot user data, not here) and its directories.
install -m 0755 /tmp/host-service /usr/local/bin/host-service
install -m 0644 /tmp/host-service.service /etc/systemd/system/host-service.service
install -d -m 0700 /etc/whist
install -d -m 0755 /whist /whist/temp
systemctl daemon-reload

for image in $MANDELBOX_IMAGES; do
  docker pull "$image"
done

# Leave no trace of the builder: logs, apt lists, the files copied in.
rm -f /tmp/host-service /tmp/host-service.service
apt-get clean
rm -rf /var/lib/apt/lists/*
