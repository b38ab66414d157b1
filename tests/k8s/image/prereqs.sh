#!/usr/bin/env bash
# System prerequisites of the image build test (tests/k8s/test_image_build.py): buildah builds the
# Dockerfile with --isolation chroot, debootstrap makes the local Debian base it builds on.
# Run as root (CI runs as root); a no-op when both are installed.
set -euo pipefail
if command -v buildah >/dev/null && command -v debootstrap >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/k8s/image/prereqs.sh: buildah/debootstrap missing; run as root: apt-get install buildah debootstrap" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends buildah debootstrap ca-certificates >/dev/null
buildah --version
