# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Here the torch 2.13 CPU wheel is on disk; elsewhere (a GPU image with torch already) the venv sees the
# system torch, and failing both, pip resolves torch>=2.11 itself.
TORCH_PIN ?= torch==2.13.0

# A second venv with Triton installed (and no GPU): code generation must not depend on Triton's absence.
TRITON_PIN ?= triton==3.7.1
TVENV      := .venv-triton

.PHONY: demo test test-triton lint gpu-test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "torch>=2.11"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/dsv4-compile demo

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q
	$(MAKE) test-triton

lint: $(BIN)/.installed
	$(BIN)/ruff check .

$(TVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install -q "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(TVENV)/bin/pip install -q -e ".[test]"
	touch $@

test-triton: $(TVENV)/.installed
	$(TVENV)/bin/python -m pytest -q tests/test_codegen.py tests/test_codegen_with_triton.py

gpu-test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) $(TVENV) .pytest_cache .ruff_cache
