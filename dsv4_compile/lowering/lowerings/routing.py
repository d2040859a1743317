"""Routing family: DeepSeek-V4's MoE router, `_moe_C::topk_softplus_sqrt`.

`topk_softplus_sqrt(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, Tensor gating_output,
bool renormalize, float routed_scaling_factor, Tensor? bias, Tensor? input_ids, Tensor? tid2eid, Tensor? is_padding,
Tensor? bias_vl=None, int image_sentinel_lo=0) -> ()`, vLLM's schema; the kernel writes the three [T, k] outs.

Per token row: scores `sqrt(softplus(logits))` (softplus is the identity past 20; a NaN score counts 0).
  - top-k rows: the k largest `score + bias` (ties to the lower expert id); the weight is the selected choice
    value minus its bias (the unbiased score, rounded as the kernel rounds it);
  - hash rows (`tid2eid` given): experts `tid2eid[input_ids[t]]`, weights their scores;
  - image rows (`bias_vl` given, `image_sentinel_lo > 0`, `input_ids[t]` one of the five sentinel ids from
    `image_sentinel_lo`): top-k by `score + bias_vl`, even in a hash layer;
  - padding rows (`is_padding[t]`): weights 0, experts -1.
Weights are multiplied by `routed_scaling_factor`, divided first by their sum when `renormalize` (a sum <= 0
divides by 1). `token_expert_indices[t, j] = j * T + t` (the expanded row of the pair), written for the rows that
take the top-k path only: hash rows keep whatever the buffer held, as does every row of the fused hash kernel the
CUDA build dispatches to for fp32 logits, k = 6, renormalize and 256 or 384 experts.
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering

# Expert counts the CUDA kernel is instantiated for; it refuses any other.
SUPPORTED_EXPERT_COUNTS = frozenset({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 192, 320, 384, 448, 576})
IMAGE_SENTINEL_COUNT = 5
SOFTPLUS_THRESHOLD = 20.0
_INDEX_DTYPES = (torch.int32, torch.uint32, torch.int64)


def check_topk_softplus_sqrt(
    topk_weights: torch.Tensor, topk_indices: torch.Tensor, token_expert_indices: torch.Tensor,
    gating_output: torch.Tensor, bias: torch.Tensor | None, input_ids: torch.Tensor | None,
    tid2eid: torch.Tensor | None, is_padding: torch.Tensor | None, bias_vl: torch.Tensor | None = None,
    **_: object,
) -> None:
    """The kernel's contract on its operands; raises ValueError with what is wrong."""
    num_experts = gating_output.shape[-1]
    if gating_output.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"gating_output must be fp32, fp16 or bf16, got {gating_output.dtype}")
    if num_experts not in SUPPORTED_EXPERT_COUNTS:
        raise ValueError(f"the kernel has no instance for {num_experts} experts")
    num_tokens = gating_output.numel() // num_experts
    topk = topk_weights.shape[-1]
    for name, out in (("topk_weights", topk_weights), ("topk_indices", topk_indices),
                      ("token_expert_indices", token_expert_indices)):
        if tuple(out.shape) != (num_tokens, topk):
            raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {(num_tokens, topk)}")
    if topk > num_experts:
        raise ValueError(f"top-{topk} of {num_experts} experts")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be fp32, got {topk_weights.dtype}")
    if topk_indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"topk_indices must be int32, uint32 or int64, got {topk_indices.dtype}")
    if token_expert_indices.dtype != torch.int32:
        raise ValueError(f"token_expert_indices must be int32, got {token_expert_indices.dtype}")
    for name, vector in (("bias", bias), ("bias_vl", bias_vl)):
        if vector is not None and (vector.dtype != torch.float32 or tuple(vector.shape) != (num_experts,)):
            raise ValueError(f"{name} must be fp32 of shape ({num_experts},), got {vector.dtype} "
                             f"{tuple(vector.shape)}")
    if (tid2eid is not None or bias_vl is not None) and input_ids is None:
        raise ValueError("hash routing (tid2eid) and image routing (bias_vl) need input_ids")
    if input_ids is not None and (tid2eid is not None or bias_vl is not None):
        if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.numel() != num_tokens:
            raise ValueError(f"input_ids must be int32 or int64 with {num_tokens} ids, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
    if tid2eid is not None:
        if tid2eid.dtype != input_ids.dtype:
            raise ValueError(f"tid2eid ({tid2eid.dtype}) and input_ids ({input_ids.dtype}) must share a dtype")
        if tid2eid.dim() != 2 or tid2eid.shape[1] != topk:
            raise ValueError(f"tid2eid must be [vocab, {topk}], got {tuple(tid2eid.shape)}")
    if is_padding is not None and (is_padding.dtype != torch.bool or tuple(is_padding.shape) != (num_tokens,)):
        raise ValueError(f"is_padding must be bool of shape ({num_tokens},), got {is_padding.dtype} "
                         f"{tuple(is_padding.shape)}")


def sqrt_softplus_scores(logits: torch.Tensor) -> torch.Tensor:
    """`sqrt(softplus(x))` in fp32, softplus the identity past 20; NaN becomes 0."""
    scores = torch.sqrt(torch.nn.functional.softplus(logits.float(), threshold=SOFTPLUS_THRESHOLD))
    return torch.where(torch.isnan(scores), torch.zeros_like(scores), scores)


def _uses_fused_hash_kernel(gating_output: torch.Tensor, num_experts: int, topk: int, renormalize: bool) -> bool:
    return gating_output.dtype == torch.float32 and topk == 6 and renormalize and num_experts in (256, 384)


@native_lowering("_moe_C::topk_softplus_sqrt", check=check_topk_softplus_sqrt,
                 mutates=("topk_weights", "topk_indices", "token_expert_indices"))
def topk_softplus_sqrt_native(
    topk_weights: torch.Tensor, topk_indices: torch.Tensor, token_expert_indices: torch.Tensor,
    gating_output: torch.Tensor, renormalize: bool, routed_scaling_factor: float, bias: torch.Tensor | None,
    input_ids: torch.Tensor | None, tid2eid: torch.Tensor | None, is_padding: torch.Tensor | None,
    bias_vl: torch.Tensor | None = None, image_sentinel_lo: int = 0,
) -> None:
    """Route every token (see the module docstring) and write the three outs."""
    num_experts, topk = gating_output.shape[-1], topk_weights.shape[-1]
    logits = gating_output.reshape(-1, num_experts)
    num_tokens = logits.shape[0]
    device = logits.device
    padding = (is_padding.reshape(-1, 1) if is_padding is not None
               else torch.zeros(num_tokens, 1, dtype=torch.bool, device=device))
    scores = torch.where(padding, 0.0, sqrt_softplus_scores(logits))  # padding rows are never scored

    row_bias = (bias.float().reshape(1, -1) if bias is not None
                else torch.zeros(1, num_experts, dtype=torch.float32, device=device))
    image_rows = torch.zeros(num_tokens, 1, dtype=torch.bool, device=device)
    if bias_vl is not None and image_sentinel_lo > 0:
        ids = input_ids.reshape(-1, 1).long()
        image_rows = (ids >= image_sentinel_lo) & (ids < image_sentinel_lo + IMAGE_SENTINEL_COUNT)
        row_bias = torch.where(image_rows, bias_vl.float().reshape(1, -1), row_bias)
    row_bias = torch.where(padding, 0.0, row_bias.expand(num_tokens, num_experts))

    # A stable descending sort keeps equal choices in expert order: ties go to the lower id, as in the kernel.
    choice = scores + row_bias
    experts = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :topk]
    weights = choice.gather(1, experts) - row_bias.gather(1, experts)
    topk_rows = torch.ones(num_tokens, 1, dtype=torch.bool, device=device)
    if tid2eid is not None:
        hash_experts = tid2eid.index_select(0, input_ids.reshape(-1).long()).long().clamp(0, num_experts - 1)
        topk_rows = image_rows
        experts = torch.where(topk_rows, experts, hash_experts)
        weights = torch.where(topk_rows, weights, scores.gather(1, hash_experts))
        if _uses_fused_hash_kernel(gating_output, num_experts, topk, renormalize):
            topk_rows = torch.zeros_like(topk_rows)

    scale = torch.full((num_tokens, 1), routed_scaling_factor, dtype=torch.float32, device=device)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        scale = scale / torch.where(total > 0, total, 1.0)
    topk_weights.copy_(weights * scale)
    topk_indices.copy_(torch.where(padding, -1, experts).to(topk_indices.dtype))
    expanded_rows = (torch.arange(topk, device=device, dtype=torch.int32) * num_tokens
                     + torch.arange(num_tokens, device=device, dtype=torch.int32).reshape(-1, 1))
    token_expert_indices.copy_(torch.where(topk_rows, expanded_rows, token_expert_indices))
