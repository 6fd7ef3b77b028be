# doge: one command to install, one to test.
#   make install   create .venv and install the pinned stack + doge (editable); idempotent
#   make test      run the offline test suite in random order (what CI runs; SEED=N repeats an order)
#   make lint      ruff
#   make bench     run the CPU benchmarks in benchmarks/ (minutes; GPU ones need a GPU)
#   make gpu-check prove the CUDA path on the GPU at hand, one report (~8 min on an H100); SMOKE=1: tiny, on CPU
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.doge-installed
# DeepSpeed builds no CUDA ops at install time (they are JIT-built when used).
export DS_BUILD_OPS := 0
# Tests and the demo never need the hub.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test lint bench gpu-check clean lock demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,serve,track]"
	@touch $(STAMP)

test: install
	@seed=$${SEED:-$$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')}; echo "test order: --randomly-seed=$$seed (make test SEED=$$seed repeats it)"; \
	$(TEST_ENV) $(BIN)/python -m pytest -q --randomly-seed=$$seed

lint: install
	$(BIN)/python -m ruff check doge_cli tests benchmarks scripts

bench: install
	@for script in benchmarks/*.py; do \
		case $$script in *_gpu.py|*/gpu_*.py) echo "skip $$script (needs a GPU)"; continue;; esac; \
		case $$script in */precision_quality.py|*/optimizer_sweep.py) [ -d demo/runs ] || { echo "skip $$script (needs make demo first)"; continue; };; esac; \
		echo "== $$script"; $(TEST_ENV) $(BIN)/python $$script || exit 1; \
	done

gpu-check: install
	$(TEST_ENV) $(BIN)/python benchmarks/gpu_check.py $(if $(SMOKE),--smoke,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Regenerate the constraints file from the current environment (after changing dependencies).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' > constraints.txt

# The whole pipeline on builtin offline data with tiny recipes (CPU, minutes); see scripts/demo.sh.
demo: install
	bash scripts/demo.sh
