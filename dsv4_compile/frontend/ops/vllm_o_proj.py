"""Ops standing for the DeepGEMM entry points vLLM's NVIDIA DeepSeek-V4 path calls as Python functions
(`vllm.utils.deep_gemm.fp8_einsum` in the o_proj, `tf32_hc_prenorm_gemm` in the tilelang mHC wrappers), so that
Dynamo records a call the backend can lower (dsv4_compile.lowering.lowerings.o_proj) instead of tracing into
DeepGEMM. Their CUDA kernels call vLLM's function, so CUDA behaviour is unchanged.

`fp8_einsum` and `tf32_hc_prenorm_gemm` here have the entry points' Python signatures and call the ops;
dsv4_compile.vllm_constructs names them as the entry points' substitutes, swapped in only while Dynamo traces (the
CUDA kernels refuse to run while a substitute is installed: they would call themselves).
`vllm::fused_inv_rope_fp8_quant_kernel`, this family's third op, is vLLM's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

from dsv4_compile.lowering.lowerings.o_proj import check_fp8_einsum, check_tf32_hc_prenorm_gemm

DEEP_GEMM_MODULE = "vllm.utils.deep_gemm"

FP8_EINSUM_SCHEMA = (
    "fp8_einsum(str equation, Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out, "
    "Tensor? c=None, int[]? recipe=None) -> ()"
)
TF32_HC_PRENORM_GEMM_SCHEMA = (
    "tf32_hc_prenorm_gemm(Tensor x, Tensor fn, Tensor(a!) out, Tensor(b!) sqrsum, int? num_split) -> ()"
)


def _vllm_entry_point(name: str) -> Callable[..., object]:
    function = getattr(importlib.import_module(DEEP_GEMM_MODULE), name)
    if function is globals().get(name):
        raise RuntimeError(f"{DEEP_GEMM_MODULE}.{name} is still replaced by its tracing substitute; "
                           "the CUDA kernel of its op would call itself")
    return function


# ----------------------------------------------------------------------------- fp8_einsum
def fp8_einsum(
    equation: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
    c: torch.Tensor | None = None, recipe: Sequence[int] | None = None,
) -> None:
    """DeepGEMM's `fp8_einsum(expr, (a, a_scale), (b, b_scale), d, c=None, recipe=...)`, as an op call."""
    torch.ops.dsv4_compat.fp8_einsum(equation, a[0], a[1], b[0], b[1], out, c,
                                     None if recipe is None else list(recipe))


def _fp8_einsum_fake(
    equation: str, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out: torch.Tensor, c: torch.Tensor | None = None, recipe: list[int] | None = None,
) -> None:
    check_fp8_einsum(equation, a, a_scale, b, b_scale, out, c, recipe)


def _fp8_einsum_cuda(
    equation: str, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out: torch.Tensor, c: torch.Tensor | None = None, recipe: list[int] | None = None,
) -> None:
    options: dict[str, object] = {}
    if c is not None:
        options["c"] = c
    if recipe is not None:
        options["recipe"] = tuple(recipe)
    _vllm_entry_point("fp8_einsum")(equation, (a, a_scale), (b, b_scale), out, **options)


# ----------------------------------------------------------------------------- tf32_hc_prenorm_gemm
def tf32_hc_prenorm_gemm(
    x: torch.Tensor, fn: torch.Tensor, out: torch.Tensor, sqrsum: torch.Tensor, num_split: int | None,
) -> None:
    """vLLM's `tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split)`, as an op call."""
    torch.ops.dsv4_compat.tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split)


def _tf32_hc_prenorm_gemm_fake(
    x: torch.Tensor, fn: torch.Tensor, out: torch.Tensor, sqrsum: torch.Tensor, num_split: int | None,
) -> None:
    check_tf32_hc_prenorm_gemm(x, fn, out, sqrsum, num_split)


def _tf32_hc_prenorm_gemm_cuda(
    x: torch.Tensor, fn: torch.Tensor, out: torch.Tensor, sqrsum: torch.Tensor, num_split: int | None,
) -> None:
    _vllm_entry_point("tf32_hc_prenorm_gemm")(x, fn, out, sqrsum, num_split)


DEFINITIONS = [
    ("dsv4_compat::fp8_einsum", FP8_EINSUM_SCHEMA, _fp8_einsum_fake, _fp8_einsum_cuda),
    ("dsv4_compat::tf32_hc_prenorm_gemm", TF32_HC_PRENORM_GEMM_SCHEMA, _tf32_hc_prenorm_gemm_fake,
     _tf32_hc_prenorm_gemm_cuda),
]
