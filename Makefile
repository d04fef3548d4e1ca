# ktflow: `make demo` runs the default pipeline, `make test` runs the test suite.
# Both create .venv on first use and install the pinned environment (no hand steps).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
# On a CPU-only host the CPU build of torch is wanted; pip prefers a local
# "+cpu" wheel when one is on its find-links, and TORCH_INDEX can name the
# PyTorch CPU index on machines that reach it.
TORCH_INDEX ?=
STAMP := $(VENV)/.ktflow-installed

.PHONY: demo test lint fmt bench install clean

install: $(STAMP)

$(STAMP): envs/requirements-cpu.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$$(sed -n 's/^torch==//p' envs/requirements-cpu.lock)
	$(PY) -m pip install -q --no-deps -r envs/requirements-cpu.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m ktflow.lf_launch version >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml
	$(VENV)/bin/ktflow tables --show results/tables

test: $(STAMP)
	$(VENV)/bin/python -m pytest -x -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(VENV)/bin/snakemake --lint --configfile config/config.yaml

fmt: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/snakefmt Snakefile workflow/rules

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf results/* .snakemake
