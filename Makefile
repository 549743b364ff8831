# Two commands on a fresh machine: `make demo` (the showcase) and `make test` (the test suite).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= showcase
# Debian packages of the peer tools the benchmarks run: RELION 3.1 (relion_refine_mpi, mpirun) for cryoem_refine.
APT_PEERS := relion

.PHONY: demo test bench clean

# torch first, pinned: the CPU build; an unpinned torch would pull the CUDA stack.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet torch==2.13.0

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

demo: $(VENV)/.core
	$(BIN)/bioinverse showcase --out $(OUT)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.bench
ifneq ($(strip $(APT_PEERS)),)
	apt-get update -qq && apt-get install -y -qq $(APT_PEERS)
endif
	$(BIN)/python -m benchmarks all --quick

clean:
	rm -rf $(VENV) $(OUT) benchmarks/results/*.json benchmarks/results/*.md benchmarks/results/*.png
