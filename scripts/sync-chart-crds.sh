#!/usr/bin/env bash
# Copies the generated CRDs (crds/, written by `kubedpo crd`) into the Helm chart, byte for byte.
# The chart copies are never edited by hand: tests/manifests fail when they differ from crds/.
#   scripts/sync-chart-crds.sh           copy
#   scripts/sync-chart-crds.sh --check   exit 1 (with a diff) if a copy is stale
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
status=0
for file in kubedpo.io_dpojobs.yaml kubedpo.io_dpopipelines.yaml; do
  SRC="$ROOT/crds/$file"
  DST="$ROOT/charts/kubedpo/crds/$file"
  if [ ! -f "$SRC" ]; then
    echo "$SRC is missing: run 'make crd' first" >&2
    exit 1
  fi
  if [ "${1:-}" = "--check" ]; then
    diff -u "$DST" "$SRC" || { echo "$DST is stale: run scripts/sync-chart-crds.sh" >&2; status=1; }
    continue
  fi
  cp "$SRC" "$DST"
  echo "synced $DST"
done
exit $status
