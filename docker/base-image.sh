#!/usr/bin/env bash
# A local Python 3.11 base image for app.Dockerfile where Flower's images cannot be pulled (no
# registry reachable): Debian bookworm (minbase) with python3, python3-venv, python3-pip and
# ca-certificates, made with debootstrap and `docker import`ed under a fixed tag. An image already
# present under that tag is reused (pass --force to rebuild it). Prints the tag on stdout.
# Needs root, debootstrap (apt-get install debootstrap) and a running Docker daemon.
# Usage: BASE_IMAGE=$(bash docker/base-image.sh)   (BASE_TAG=<tag> names it otherwise)
set -euo pipefail
tag="${BASE_TAG:-fedlora-flwr-base:bookworm-py311}"
if [[ "${1:-}" != "--force" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base-image.sh: $tag already present, reused" >&2
  echo "$tag"
  exit 0
fi
[[ "$(id -u)" == 0 ]] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
started=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$dir/rootfs" >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
tar -C "$dir/rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "base-image.sh: built $tag in $((SECONDS - started)) s" >&2
echo "$tag"
