# Gorgon: `make serve` and `make test` work from a fresh clone; both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# Machines without CUDA get the CPU build of torch (a bare `torch` pulls a multi-GB CUDA
# build); a machine with an NVIDIA driver keeps or gets PyPI's CUDA build.
TORCH_CPU_SPEC ?= torch==2.13.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=

.PHONY: install serve test test-slow test-all fetch-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_CUDA),yes)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU_SPEC)
endif
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m models.cpu_kernels   # compiles the CPU kernels once (about a minute); cached after
	touch $@

fetch-model: install
	$(PY) -m models.fetch

serve: fetch-model
	$(PY) -m server --host $(HOST) --port $(PORT)

# The default suite: everything but the tests marked @pytest.mark.slow.
test: install fetch-model
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The heavy tests only (CI runs them after `make test`).
test-slow: install fetch-model
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Everything.
test-all: install fetch-model
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

include deploy/docker.mk
-include loadtest/loadtest.mk
