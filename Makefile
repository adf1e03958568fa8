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

# Test files spread over up to 4 processes (pytest-xdist, a file per process so module fixtures are built once),
# then the Ray tests by themselves: their worker processes need the cores, and slowed 4x beside other tests.
TEST_JOBS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not alone" --durations=10
	$(BIN)/python -m pytest -q -m alone --durations=5

webui: $(STAMP)
	$(BIN)/streamlit run webui.py --server.address 127.0.0.1

bench: $(STAMP)
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/cache_cost.py

# Generated demo assets and test screenshots only: the render folders (the web UI's too) are never deleted here.
clean:
	rm -rf assets test-artifacts
