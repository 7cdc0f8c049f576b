# `make test` and `make serve` bootstrap .venv from the lock on first use, and again whenever the lock changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU development lock pins the local CPU wheel of torch (a bare `torch` would pull a multi-GB CUDA build);
# machines with a GPU take the CUDA runtime lock that the Docker image uses, plus the dev tools.
CPU_LOCK := requirements/dev-cpu.lock
CUDA_LOCK := requirements/serve-cuda.lock
# Runtime only, CPU torch: what the wheel test installs, and what a CPU build of the image would.
SERVE_CPU_LOCK := requirements/serve-cpu.lock
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
LOCK := $(if $(HAS_CUDA),$(CUDA_LOCK),$(CPU_LOCK))
# The CPU lock holds the dev tools too; on CUDA machines they are resolved against the locked runtime.
PROJECT := $(if $(HAS_CUDA),-e ".[dev]",--no-deps -e .)
COMPILE := .venv-lock/bin/uv pip compile --quiet --generate-hashes pyproject.toml

.PHONY: venv tools test test-all test-latest serve lint format lock bench clean

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet $(PROJECT)
	touch $@

# Debian tools the default tier drives: chromium (demo-page browser test), promtool (Prometheus config and
# rules), kubectl (Kustomize render of deploy/k8s) and PostgreSQL (the shared job store's tests), never downloaded
# browsers or binaries. Installed where we can (root with apt-get).
tools:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null 2>&1 || missing="$$missing kubernetes-client"; \
	command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "cannot install$$missing here (needs root and apt-get): tests that drive them will fail"; fi; \
	fi

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

test-all: $(STAMP) tools
	$(BIN)/python -m pytest -q -m "not gpu"

# Upstream breakage on purpose: a throwaway venv from the unlocked ranges of pyproject.toml, then the default tier.
test-latest: tools
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet "torch==2.13.0"
	.venv-latest/bin/pip install --quiet -e ".[dev]"
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q

serve: $(STAMP)
	$(BIN)/aptserve serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Regenerate the locks from pyproject.toml (needs PyPI; the CPU lock also needs the local torch CPU wheel).
lock:
	test -x .venv-lock/bin/uv || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv; }
	$(COMPILE) requirements/torch-cpu.in --extra dev --python-version 3.11 --find-links /opt/wheels \
		--no-emit-find-links -o $(CPU_LOCK)
	$(COMPILE) requirements/torch-cpu.in --python-version 3.11 --find-links /opt/wheels \
		--no-emit-find-links -o $(SERVE_CPU_LOCK)
	# The image runs the versions the CPU tiers test: its lock is resolved within the CPU serve lock's pins.
	grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' $(SERVE_CPU_LOCK) | sed 's/ .*//' | grep -v '^torch==' > .venv-lock/pins.txt
	$(COMPILE) requirements/torch-cuda.in --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
		-c .venv-lock/pins.txt -o $(CUDA_LOCK)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/cpu_e2e.py

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build dist *.egg-info
