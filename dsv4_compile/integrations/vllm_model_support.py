"""What of a DeepSeek-V4 deployment the plugin's NVIDIA path covers, checked when vLLM builds the model.

A feature the backend does not lower would otherwise surface late and misleadingly: at the first forward, as a
CUDA-only op with no kernel for the target (DeepGEMM MegaMoE, an MXFP4 expert GEMM), or as weights loaded into
layers whose kernels never run. The plugin checks the engine's configuration before construction and refuses,
naming each uncovered feature, where it is set and what is covered instead.

One table: (feature, what to change, predicate over vLLM's config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class UnsupportedDeepseekV4Feature(NotImplementedError):
    """The engine's configuration asks for a DeepSeek-V4 feature dsv4_xpu does not lower."""


class Feature(NamedTuple):
    name: str
    remedy: str
    present: Callable[[Any], str | None]  # vllm_config -> what was found, or None when absent


def _moe_backend(vllm_config: Any) -> str | None:
    from vllm.config.kernel import MEGA_MOE_BACKENDS

    backend = getattr(vllm_config.kernel_config, "moe_backend", None)
    return f"kernel_config.moe_backend={backend!r}" if backend in MEGA_MOE_BACKENDS else None


def _quantization(vllm_config: Any) -> str | None:
    quant_config = vllm_config.quant_config
    if quant_config is None:
        return None
    hf_config = vllm_config.model_config.hf_config
    expert_dtype = getattr(hf_config, "expert_dtype", None)
    experts = f", expert_dtype={expert_dtype!r}" if expert_dtype is not None else ""
    return f"quantization {quant_config.get_name()!r}{experts} (the checkpoint's quantization_config)"


def _speculative(vllm_config: Any) -> str | None:
    speculative = vllm_config.speculative_config
    return None if speculative is None else f"speculative_config.method={speculative.method!r}"


FEATURES: tuple[Feature, ...] = (
    Feature("DeepGEMM / FlashInfer MegaMoE experts", "leave kernel_config.moe_backend at its default (vLLM's "
            "FusedMoE, whose routing the backend lowers)", _moe_backend),
    Feature("quantized weights (FP8 block linears, MXFP4 / FP8 experts)", "serve a bf16 checkpoint (no "
            "quantization_config): the backend lowers the FP8 KV cache and o_proj einsum, not quantized GEMMs",
            _quantization),
    Feature("multi-token-prediction / DSpark draft heads", "serve without a speculative_config", _speculative),
)


def check_supported(vllm_config: Any) -> None:
    """Raise UnsupportedDeepseekV4Feature naming every FEATURES entry present in `vllm_config`."""
    found = [(feature, where) for feature in FEATURES if (where := feature.present(vllm_config)) is not None]
    if found:
        lines = "\n".join(f"  - {feature.name}: {where}; {feature.remedy}" for feature, where in found)
        raise UnsupportedDeepseekV4Feature(
            f"dsv4_compile's NVIDIA DeepSeek-V4 path (DSV4_COMPILE_NVIDIA_PATH=1) does not cover:\n{lines}")
