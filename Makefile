# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (llama-cpp-python builds from source,
# about 6 minutes on 2 cores the first time; pip caches the wheel afterwards).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshnode-installed

.PHONY: demo test lint install contract clean llama-build

# llama.cpp build profile: auto (= cpu-native-safe: this CPU's ISA without AMX),
# cpu-portable, or cuda (with CUDA_ARCH=90 etc.). See kernels/README.md.
LLAMA_PROFILE ?= auto
CUDA_ARCH ?=

$(STAMP): pyproject.toml kernels/build_llama.py meshnode/core/cpu_features.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	LLAMA_PROFILE=$(LLAMA_PROFILE) CUDA_ARCH=$(CUDA_ARCH) $(BIN)/python kernels/build_llama.py
	$(BIN)/pip install --progress-bar off -e '.[dev,demo]'
	touch $(STAMP)

# Rebuild llama-cpp-python with another profile, e.g. `make llama-build LLAMA_PROFILE=cuda CUDA_ARCH=90`.
llama-build: $(STAMP)
	LLAMA_PROFILE=$(LLAMA_PROFILE) CUDA_ARCH=$(CUDA_ARCH) $(BIN)/python kernels/build_llama.py

install: $(STAMP)

demo: $(STAMP) contract
	$(BIN)/meshnode demo

lint: $(STAMP)
	$(BIN)/ruff check meshnode tests bench
	$(BIN)/mypy

# The payment-channel contract code comes from the npm package tonweb at set-up time,
# checked against its pinned code hash and cached outside the repository.
contract: $(STAMP)
	$(BIN)/python -m meshnode.pay.contract.code

# pytest exits 5 when it collects nothing; for us that is a failure, not a pass.
test: lint contract
	$(BIN)/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
