# Two commands do all set-up on a fresh machine: `make serve` (main job) and `make test`.
#
# .venv is the product exactly as it ships: `pip install -c deploy/constraints.txt .`, no extras, not
# editable (what the Dockerfile installs, at the same pinned versions), so `make serve` runs what users
# run, and the acceptance tests start the server from it.
# .venv-dev holds the test tools only (pytest, ruff, the dev extra's packages) and sees .venv's packages
# through a .pth file: one install of torch and ray, and nothing dev-only can leak into the product's venv.
PY ?= python3
VENV := .venv
DEV := .venv-dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(DEV)/.installed
CONSTRAINTS := deploy/constraints.txt
SOURCES := pyproject.toml $(CONSTRAINTS) $(shell find merge training serving mergeserve benchmarks -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: install serve test lint bench clean prometheus-tools browser-tools constraints

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) .
	rm -rf build
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	test -x $(DEV)/bin/python || $(PY) -m venv $(DEV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > $$($(DEV)/bin/python -c "import site; print(site.getsitepackages()[0])")/mergeserve-product.pth
	$(DEV)/bin/pip install --upgrade pip
	$(DEV)/bin/pip install -c $(CONSTRAINTS) '.[dev]'
	rm -rf build
	touch $(DEV_STAMP)

install: $(STAMP)

# deploy/constraints.txt from a fresh venv's resolution of pyproject.toml (run after changing dependencies)
constraints:
	rm -rf build/constraints-venv && $(PY) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install --upgrade pip && build/constraints-venv/bin/pip install .
	{ sed -n '/^#/p' $(CONSTRAINTS); build/constraints-venv/bin/pip freeze --exclude mergeserve; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf build

serve: $(STAMP)
	$(BIN)/mergeserve serve

# tests/deploy and tests/serving/test_prometheus.py run promtool, amtool, a real Prometheus and a real
# Alertmanager: install Debian's `prometheus` (it ships promtool) and `prometheus-alertmanager` (amtool)
# packages only when a binary is missing (root, or sudo). The alertmanager package adds ~14 s to a fresh
# machine's first `make test` (apt-get update included), nothing after.
PROM_TOOLS := promtool prometheus amtool prometheus-alertmanager
prometheus-tools:
	@( for t in $(PROM_TOOLS); do command -v $$t > /dev/null || exit 1; done ) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends \
	    prometheus prometheus-alertmanager; }

# tests/serving/test_console.py drives the console (GET /ui) in a real browser: Debian's `chromium`, through
# playwright (the dev extra), never playwright's own browser download (no network beyond the package
# registries). Installed only when missing: 45 s on 2 cores, measured once (docs/console.md, "The browser test").
browser-tools:
	@command -v chromium > /dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends \
	    chromium fonts-dejavu-core; }

test: $(DEV_STAMP) prometheus-tools browser-tools
	$(DEV)/bin/ruff check .
	$(DEV)/bin/python -m pytest

lint: $(DEV_STAMP)
	$(DEV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEV) .pytest_cache .ruff_cache *.egg-info build
