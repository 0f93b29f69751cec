# Tidepool: `make up` runs the platform on this machine, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Builds and sandboxes trust the host's CA bundle (TLS-intercepting proxies, enterprise CAs); override or empty it.
TIDEPOOL_CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
export TIDEPOOL_CA_BUNDLE

.PHONY: up up-detached down test unit integration lint bench host venv clean asyncapi dashboard

# A machine's pip configuration may name package folders it lacks; pip warns once per package: filtered.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install --quiet --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	set -o pipefail; $(BIN)/pip install --quiet -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(STAMP)

# checkov (tests/unit/deploy) pins packaging<24, which pytest cannot share: a virtualenv of its own.
CHECKOV_STAMP := $(VENV)/checkov/.installed
$(CHECKOV_STAMP): deploy/k8s/tests/checkov-requirements.txt
	test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	set -o pipefail; $(VENV)/checkov/bin/pip install --quiet -r $< 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(CHECKOV_STAMP)

venv: $(STAMP) $(CHECKOV_STAMP)

host:
	bash scripts/setup-host.sh

up: venv host
	$(BIN)/python -m tidepool_stack up

up-detached: venv host
	$(BIN)/python -m tidepool_stack up --detach

down: venv
	$(BIN)/python -m tidepool_stack down

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python scripts/lint_tests.py

asyncapi: venv  # regenerate docs/asyncapi/asyncapi.yaml from the services' subscribers and publishers
	$(BIN)/python scripts/asyncapi.py

# Rebuilds the dashboard (interfaces/dashboard) into services/api/tidepool_api/dashboard, which is committed:
# only this target needs Node (20+) and the npm registry; `make up` serves the built files.
dashboard:
	cd interfaces/dashboard && npm ci --no-audit --no-fund && npm run build

unit: venv
	$(BIN)/python -m pytest tests/unit -q

# Unit tests on both cores (pytest-xdist; each test brings its own servers), then the integration tests one
# at a time (they share one stack); both run, and either failing fails the target.
test: venv host lint
	$(BIN)/python -m pytest tests/unit -q -ra -n 2 --durations=20; unit=$$?; \
	$(BIN)/python -m pytest tests/integration -q -ra --durations=40; integration=$$?; \
	test $$unit -eq 0 && test $$integration -eq 0

bench: venv host
	$(BIN)/python -m tests.bench.bench_spine


clean:  # after `make down`: what is still mounted under .tidepool (the runner's tmpfs, sandbox disks) goes first
	-awk '{print $$5}' /proc/self/mountinfo | grep '^$(CURDIR)/.tidepool/' | sort -r | xargs -r -n1 umount -l
	rm -rf $(VENV) .tidepool
