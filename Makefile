# Tether — developer entry points. Every target sets up what it needs itself.
#
#   make run          dev stack + CRDs + samples, then the operator in the foreground
#   make test         lint, unit tests, end-to-end tests on the dev stack
#   make unit         unit tests only (no servers)
#   make e2e          end-to-end tests only (starts the dev stack if needed)
#   make test-faults  fault-injection suite (kills/pauses Consul, etcd, kube-apiserver, operator)
#   make bench        benchmarks; prints a table, writes benchmarks/results/latest.json and,
#                     per kind (apply → Ready, drift repair, idle writes), medians-latest.json
#   make lint         ruff + mypy --strict + import-linter layer contracts
#   make binaries     build/locate kube-apiserver, kubectl, etcd, consul (cached outside the repo)
#   make dev-up / dev-down / dev-status
#   make image        the operator image (docker build; starts an engine if none answers)
#   make e2e-kind     the end-to-end suite on a kind cluster (scripts/e2e-kind.sh: builds
#                     what it cannot pull; see the README's kind section)
#   make engine-up / engine-down   the Docker engine scripts/kind/engine.sh starts
#   make release      dist/install.yaml (CRDs + manifests, the image by digest when built)
#                     and dist/sbom.spdx.json (scripts/release.sh; version from pyproject.toml)

SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
TETHER := $(VENV)/bin/tether
PYTEST_ARGS ?=

.PHONY: lock venv run test unit e2e test-faults bench lint binaries dev-up dev-down dev-status image e2e-kind engine-up engine-down release clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml devtools/pyproject.toml
	@scripts/venv.sh $(VENV)

binaries: venv
	@$(PY) -m tether_dev.binaries

run: venv
	@scripts/run-dev.sh

lint: venv
	$(VENV)/bin/ruff check operator tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

unit: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

e2e: venv binaries
	$(PY) -m pytest tests/e2e -v -m "e2e and not faults" $(PYTEST_ARGS)

# tests/kind is included so that, without Docker, its tests show as skipped with the reason.
test: venv binaries lint
	$(PY) -m pytest tests/unit tests/e2e tests/kind -m "not faults" -v -rs $(PYTEST_ARGS)

# The HA runs partition members with iptables (root); Debian images may lack it.
test-faults: venv binaries
	@command -v iptables >/dev/null || [ "$$(id -u)" != 0 ] || { \
		echo "installing iptables for the HA fault runs"; \
		apt-get install -y -qq iptables >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq iptables >/dev/null; }; }
	$(PY) -m pytest tests/faults -v -s $(PYTEST_ARGS)

bench: venv binaries
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(TETHER) dev up
	$(PY) -m benchmarks.medians $(MEDIANS_ARGS) | tee benchmarks/results/medians-latest.json

# requirements.lock: every runtime package and build tool, pinned with hashes, for the image.
lock: venv
	$(VENV)/bin/python -m pip install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --all-build-deps \
		--no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

dev-up: venv binaries
	$(TETHER) dev up
dev-down: venv
	$(TETHER) dev down
dev-status: venv
	$(TETHER) dev status

# The pinned python base, or (no registry) a Debian bookworm base built here.
image:
	@DOCKER_HOST="$${DOCKER_HOST:-$$(scripts/kind/engine.sh up)}" scripts/kind/operator-image.sh tether:dev

e2e-kind: venv
	scripts/e2e-kind.sh

engine-up:
	@host="$$(scripts/kind/engine.sh up)"; echo "export DOCKER_HOST=$$host"
engine-down:
	scripts/kind/engine.sh down

# No venv needed: the script uses kubectl and the standard library only.
release:
	scripts/release.sh dist

clean:
	-$(TETHER) dev down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
