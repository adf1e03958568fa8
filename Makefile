# Quick start: `make demo` then `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test webui bench clean

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffsynth demo
	$(BIN)/diffsynth status runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

webui: $(STAMP)
	$(BIN)/streamlit run webui.py --server.address 127.0.0.1

bench: $(STAMP)
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/cache_cost.py

# Generated demo assets and test screenshots only: the render folders (the web UI's too) are never deleted here.
clean:
	rm -rf assets test-artifacts
