#!/usr/bin/env bash
# Re-pin both images' base (ARG PYTHON_IMAGE) to the current digest of a tag.
#   scripts/pin-base-image.sh                          # python:3.11-slim-bookworm, the tag in use
#   scripts/pin-base-image.sh python:3.11-slim-bookworm
# Needs registry access and one of: docker (buildx), crane, skopeo. Run it with each Python
# security release (or let Renovate's dockerfile manager open the same change), then rebuild the
# images and run `make test` (tests/manifests/test_dockerfiles.py checks the pin's form).
# The digest is the multi-platform index's, so amd64 and arm64 builds resolve from the same pin.
set -euo pipefail
cd "$(dirname "$0")/.."
files=(Dockerfile trainer_image/Dockerfile)
tag="${1:-$(sed -n 's/^ARG PYTHON_IMAGE=\([^@]*\).*/\1/p' Dockerfile)}"
if command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
  digest="$(docker buildx imagetools inspect "$tag" --format '{{json .Manifest.Digest}}' | tr -d '"')"
elif command -v crane >/dev/null; then
  digest="$(crane digest "$tag")"
elif command -v skopeo >/dev/null; then
  digest="$(skopeo inspect --raw "docker://$tag" | sha256sum | awk '{print "sha256:" $1}')"
else
  echo "pin-base-image: needs docker buildx, crane or skopeo (and access to the registry)" >&2
  exit 2
fi
if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "pin-base-image: '$tag' resolved to '$digest', not a sha256 digest" >&2
  exit 1
fi
for f in "${files[@]}"; do
  sed -i "s|^ARG PYTHON_IMAGE=.*|ARG PYTHON_IMAGE=${tag}@${digest}|" "$f"
done
echo "pinned ${tag}@${digest} in ${files[*]}"
