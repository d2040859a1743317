"""The routing op of vLLM's NVIDIA DeepSeek-V4 MoE, with vLLM's schema, for builds without `_moe_C` (its CPU
build): `_moe_C::topk_softplus_sqrt`, which `vllm._custom_ops.topk_hash_softplus_sqrt` calls. Lowered by
dsv4_compile.lowering.lowerings.routing.

And vLLM's CPU routing kernels, which its FusedMoE calls on a CPU platform (router/cpu_router.py
`_sqrtsoftplus_bias_topk`), for its CPU libraries without them (all but the AVX-512 BF16 one): a CPU kernel of
the same routing math, `topk_softplus_sqrt_native`. `hash_topk_cpu` gets each token's expert row
(`tid2eid[input_ids]`), weights the experts' sqrt-softplus scores, renormalised to sum to the scaling factor;
`biased_topk_cpu` picks the top-k of score + bias and weights the unbiased scores (scaled only when renormalised).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.routing import check_topk_softplus_sqrt, topk_softplus_sqrt_native

TOPK_SOFTPLUS_SQRT_SCHEMA = (
    "topk_softplus_sqrt(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, "
    "Tensor gating_output, bool renormalize, float routed_scaling_factor, Tensor? bias, Tensor? input_ids, "
    "Tensor? tid2eid, Tensor? is_padding, Tensor? bias_vl=None, int image_sentinel_lo=0) -> ()"
)


def _topk_softplus_sqrt_fake(
    topk_weights: torch.Tensor, topk_indices: torch.Tensor, token_expert_indices: torch.Tensor,
    gating_output: torch.Tensor, renormalize: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
    input_ids: torch.Tensor | None, tid2eid: torch.Tensor | None, is_padding: torch.Tensor | None,
    bias_vl: torch.Tensor | None = None, image_sentinel_lo: int = 0,
) -> None:
    check_topk_softplus_sqrt(topk_weights, topk_indices, token_expert_indices, gating_output, bias, input_ids,
                             tid2eid, is_padding, bias_vl)


DEFINITIONS = [
    ("_moe_C::topk_softplus_sqrt", TOPK_SOFTPLUS_SQRT_SCHEMA, _topk_softplus_sqrt_fake),
]


HASH_TOPK_CPU_SCHEMA = (
    "hash_topk_cpu(Tensor gating_output, Tensor tid2eid, int topk, str scoring_func, int num_fused_shared_experts, "
    "int num_experts, float routed_scaling_factor) -> (Tensor, Tensor)"
)
BIASED_TOPK_CPU_SCHEMA = (
    "biased_topk_cpu(Tensor hidden_states, Tensor gating_output, Tensor correction_bias, int topk, bool renormalize, "
    "str scoring_func, int num_fused_shared_experts, float? routed_scaling_factor, "
    "bool apply_routed_scaling_factor_on_output) -> (Tensor, Tensor)"
)


def _routing_outs(rows: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = rows.shape[0]
    return (rows.new_empty((num_tokens, topk), dtype=torch.float32),
            rows.new_empty((num_tokens, topk), dtype=torch.int32))


def _check_cpu_routing(scoring_func: str, num_fused_shared_experts: int) -> None:
    if scoring_func != "sqrtsoftplus" or num_fused_shared_experts != 0:
        raise NotImplementedError(f"CPU routing stand-in: scoring_func {scoring_func!r} with "
                                  f"{num_fused_shared_experts} fused shared experts (only sqrtsoftplus, 0)")


def _hash_topk_cpu_fake(gating_output: torch.Tensor, tid2eid: torch.Tensor, topk: int, scoring_func: str,
                        num_fused_shared_experts: int, num_experts: int,
                        routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _routing_outs(gating_output, topk)


def hash_topk_cpu(gating_output: torch.Tensor, tid2eid: torch.Tensor, topk: int, scoring_func: str,
                  num_fused_shared_experts: int, num_experts: int,
                  routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cpu_routing(scoring_func, num_fused_shared_experts)
    weights, experts = _routing_outs(gating_output, topk)
    rows = torch.arange(gating_output.shape[0], dtype=tid2eid.dtype)
    topk_softplus_sqrt_native(weights, experts, torch.empty_like(experts), gating_output.float(), True,
                              routed_scaling_factor, None, rows, tid2eid, None)
    return weights, experts


def _biased_topk_cpu_fake(hidden_states: torch.Tensor, gating_output: torch.Tensor, correction_bias: torch.Tensor,
                          topk: int, renormalize: bool, scoring_func: str, num_fused_shared_experts: int,
                          routed_scaling_factor: float | None,
                          apply_routed_scaling_factor_on_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _routing_outs(hidden_states, topk)


def biased_topk_cpu(hidden_states: torch.Tensor, gating_output: torch.Tensor, correction_bias: torch.Tensor,
                    topk: int, renormalize: bool, scoring_func: str, num_fused_shared_experts: int,
                    routed_scaling_factor: float | None,
                    apply_routed_scaling_factor_on_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_cpu_routing(scoring_func, num_fused_shared_experts)
    weights, experts = _routing_outs(hidden_states, topk)
    # vLLM's kernel scales only renormalised weights (seen on its AVX-512 BF16 library); its CUDA routing op
    # scales either way. DeepSeek-V4 always renormalises.
    scaled = renormalize and apply_routed_scaling_factor_on_output and routed_scaling_factor
    scale = routed_scaling_factor if scaled else 1.0
    topk_softplus_sqrt_native(weights, experts, torch.empty_like(experts), gating_output.float(), renormalize,
                              scale, correction_bias.float(), None, None, None)
    return weights, experts


CPU_DEFINITIONS = [
    ("_C::hash_topk_cpu", HASH_TOPK_CPU_SCHEMA, _hash_topk_cpu_fake, hash_topk_cpu),
    ("_C::biased_topk_cpu", BIASED_TOPK_CPU_SCHEMA, _biased_topk_cpu_fake, biased_topk_cpu),
]
