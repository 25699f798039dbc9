#!/usr/bin/env bash
# Copies the generated DPOJob CRD (crds/, written by `kubedpo crd`) into the Helm chart, byte for byte.
# The chart copy is never edited by hand: tests/manifests fail when it differs from crds/.
#   scripts/sync-chart-crds.sh           copy
#   scripts/sync-chart-crds.sh --check   exit 1 (with a diff) if the copy is stale
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/crds/kubedpo.io_dpojobs.yaml"
DST="$ROOT/charts/kubedpo/crds/kubedpo.io_dpojobs.yaml"
if [ ! -f "$SRC" ]; then
  echo "$SRC is missing: run 'make crd' first" >&2
  exit 1
fi
if [ "${1:-}" = "--check" ]; then
  diff -u "$DST" "$SRC" || { echo "$DST is stale: run scripts/sync-chart-crds.sh" >&2; exit 1; }
  exit 0
fi
cp "$SRC" "$DST"
echo "synced $DST"
