# Both targets build .venv on first use; later runs reuse it and reinstall only when
# pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch build this machine has on disk (a CUDA build that also runs on the CPU);
# override, e.g. TORCH_SPEC="torch torchvision", elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= outputs/demo
STMDIT_TEST_DATA ?= ../shared/data
export STMDIT_TEST_DATA

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/stmdit demo --out $(DEMO_OUT)

test: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
