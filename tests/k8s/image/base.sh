#!/usr/bin/env bash
# A local stand-in for the CUDA PyTorch base image (no container registry is reachable here):
# Debian bookworm (minbase, by debootstrap) with Python 3.11 in a virtual environment at /opt/conda
# on PATH -- the layout of the pytorch/pytorch images (`python`, `pip` first on PATH), no torch:
# the Dockerfile installs it from constraints.txt.
#
#   tests/k8s/image/base.sh          -> prints the image name, e.g. localhost/selftrain-test-base:3f2a9c1d7e40
#
# Cached by content: the rootfs tarball under ${SELFTRAIN_CACHE:-~/.cache/selftrain}/image-base/ is
# keyed by a hash of its recipe (made once per recipe); the image tag also covers the host's CA bundle,
# which is copied in (with PIP_CERT, SSL_CERT_FILE pointing at it) so that pip in the build trusts
# what the host trusts (a TLS-inspecting proxy's CA). It is re-imported when buildah's storage no
# longer has the image. Needs root, debootstrap and buildah (tests/k8s/image/prereqs.sh).
set -euo pipefail
SUITE=bookworm
MIRROR="${SELFTRAIN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv,ca-certificates,passwd
cache="${SELFTRAIN_CACHE:-$HOME/.cache/selftrain}/image-base"
CA_BUNDLE="${SELFTRAIN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
# The rootfs recipe: change RECIPE_VERSION with any change to the debootstrap/venv steps below.
RECIPE_VERSION=1
key="$(echo "$RECIPE_VERSION $SUITE $PACKAGES $MIRROR /opt/conda" | sha256sum | cut -c1-12)"
tag="$(cat "${BASH_SOURCE[0]}" "$CA_BUNDLE" | sha256sum | cut -c1-12)"  # the import step and the CA too
image="localhost/selftrain-test-base:$tag"
tarball="$cache/$key.tar"
log() { echo "[base $(date +%T)] $*" >&2; }

if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image"; exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"; flock 9
if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image"; exit 0
fi

if [ ! -s "$tarball" ]; then
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  log "debootstrap $SUITE (minbase, $PACKAGES) from $MIRROR"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$cache/debootstrap.log" 2>&1 \
    || { tail -30 "$cache/debootstrap.log" >&2; exit 1; }
  log "python venv at /opt/conda"
  chroot "$root" /usr/bin/python3 -m venv /opt/conda
  chroot "$root" /opt/conda/bin/python -m pip --version >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # apt inside the build: the same mirror
  printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$root"; trap - EXIT
fi

log "importing $tarball as $image"
ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt="$(buildah mount "$ctr")"
tar -C "$mnt" --numeric-owner -xf "$tarball"
cp "$CA_BUNDLE" "$mnt/etc/ssl/certs/ca-certificates.crt"
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --env REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
  --workingdir / --cmd /bin/bash "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
echo "$image"
