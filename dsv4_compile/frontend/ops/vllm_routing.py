"""The routing op of vLLM's NVIDIA DeepSeek-V4 MoE, with vLLM's schema, for builds without `_moe_C` (its CPU
build): `_moe_C::topk_softplus_sqrt`, which `vllm._custom_ops.topk_hash_softplus_sqrt` calls. Lowered by
dsv4_compile.lowering.lowerings.routing.
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.routing import check_topk_softplus_sqrt

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
