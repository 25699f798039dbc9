# syntax=docker/dockerfile:1
# kubedpo operator image: `kubedpo operator` (kopf) and `kubedpo crd|validate|run`.
#   docker build -t ghcr.io/kubedpo/operator:0.1.0 .
# Only the base dependencies are installed (pydantic, kopf, kubernetes, kubernetes-validate, boto3, prometheus-client):
# the operator imports kubedpo_trainer.config (pure pydantic) but never torch, so the `trainer`
# extra stays out. Size: about 0.3 GB (python:3.11-slim is ~0.15 GB; boto3/botocore, kubernetes,
# kopf and pydantic add the rest), not the 150 MB an earlier comment claimed.
# OCI labels: docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
# Base pinned by digest (the multi-platform index of python:3.11-slim-bookworm, Python 3.11.16, as
# recorded by docker-library/repo-info). Update: scripts/pin-base-image.sh (docker buildx, crane or
# skopeo) rewrites this ARG in both Dockerfiles; run it with each Python security release.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

# --- builder: resolve the pinned set into a venv (pip, wheels and build tools stay here) ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
COPY trainer_image/kubedpo_trainer trainer_image/kubedpo_trainer
COPY operator/kubedpo_operator operator/kubedpo_operator
# Same constraints file as `make install`, so the image runs the versions the tests ran.
# kubernetes-validate ships 26 schema sets (~110 MB); the operator reads only the strict ones of
# 1.28 and the newest (kubedpo_operator.k8s_openapi), so the others are dropped.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install -c requirements/constraints.txt . \
    && root="$(python -c 'import kubernetes_validate, os; print(os.path.dirname(kubernetes_validate.__file__))')/kubernetes-json-schema" \
    && newest="$(find "$root" -maxdepth 1 -name 'v*-local-strict' -printf '%f\n' | sort -V | tail -n 1)" \
    && find "$root" -mindepth 1 -maxdepth 1 ! -name v1.28.0-local-strict ! -name "$newest" -exec rm -rf {} + \
    && python -c 'from kubedpo_operator import k8s_openapi as k; [k.definitions(v) for v in k.supported_versions()]' \
    && kubedpo crd > /dev/null

# --- runtime: the venv only, non-root (restricted Pod Security Standard) ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kubedpo-operator" \
      org.opencontainers.image.description="Kubernetes operator for DPO fine-tuning jobs (DPOJob)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kubedpo/kubedpo" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric UID/GID so the kubelet can verify runAsNonRoot without an /etc/passwd lookup.
USER 65532:65532
# 8080: operator metrics, 8081: kopf liveness (kubedpo_operator.settings defaults, the chart's ports).
EXPOSE 8080 8081
ENTRYPOINT ["kubedpo"]
CMD ["operator"]
