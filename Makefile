# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (llama-cpp-python builds from source,
# about 6 minutes on 2 cores the first time; pip caches the wheel afterwards).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshnode-installed

.PHONY: demo test lint install contract clean llama-build test-deps browser-deps \
	interop-deps fuzz chaos

# llama.cpp build profile: auto (= cpu-native-safe: this CPU's ISA without AMX),
# cpu-portable, or cuda (with CUDA_ARCH=90 etc.). See kernels/README.md.
LLAMA_PROFILE ?= auto
CUDA_ARCH ?=

$(STAMP): pyproject.toml kernels/build_llama.py meshnode/core/cpu_features.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	LLAMA_PROFILE=$(LLAMA_PROFILE) CUDA_ARCH=$(CUDA_ARCH) $(BIN)/python kernels/build_llama.py
	$(BIN)/pip install --progress-bar off -e '.[dev,demo,bench]'
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

# System tools some tests drive (installed once, idempotent, no prompts): Debian's
# chromium + npm playwright-core for the status-page test, systemd-analyze for the unit.
# apt needs root (CI runs as root); elsewhere a missing tool is named, not installed.
BROWSER_DIR := $(HOME)/.cache/meshnode/browser
PLAYWRIGHT_CORE := 1.64.1
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

define apt_need # command, Debian package
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq || true) && $(APT_INSTALL) $(2) >/dev/null; \
	  else echo "note: $(1) is missing (Debian package $(2)); its tests will say so" >&2; fi; }
endef

browser-deps:
	$(call apt_need,chromium,chromium)
	@test -d $(BROWSER_DIR)/node_modules/playwright-core || \
	  npm install --prefix $(BROWSER_DIR) --no-audit --no-fund --ignore-scripts \
	    --loglevel=error playwright-core@$(PLAYWRIGHT_CORE)

# js-libp2p for tests/test_interop_js.py, at the versions pinned in tests/interop/package.json,
# installed outside the repository; reinstalled when that file changes.
INTEROP_DIR := $(HOME)/.cache/meshnode/interop

interop-deps:
	@mkdir -p $(INTEROP_DIR)
	@cmp -s tests/interop/package.json $(INTEROP_DIR)/package.json && \
	  test -d $(INTEROP_DIR)/node_modules/libp2p || { \
	  cp tests/interop/package.json $(INTEROP_DIR)/package.json && \
	  npm install --prefix $(INTEROP_DIR) --no-audit --no-fund --ignore-scripts \
	    --loglevel=error; }

test-deps: browser-deps interop-deps
	$(call apt_need,systemd-analyze,systemd)

# pytest exits 5 when it collects nothing; for us that is a failure, not a pass.
test: lint contract test-deps
	$(BIN)/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Long runs (not part of `make test`): 10^6 inputs per decoder target, and 50 jobs under
# SIGKILL / SIGSTOP / cut providers; each writes its JSON under bench/results/.
FUZZ_INPUTS ?= 1000000
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py --inputs $(FUZZ_INPUTS)

chaos: $(STAMP) contract
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
