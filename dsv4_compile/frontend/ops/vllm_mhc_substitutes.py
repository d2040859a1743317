"""Stand-ins for vLLM's mHC Python entry points that are not ops, written with its registered `vllm::` ops
and plain torch so that Dynamo can trace them (and the backend lower the ops) on any machine.

Each stand-in has the original's signature; dsv4_compile.vllm_constructs names the function it replaces.
"""

from __future__ import annotations

import torch


def mhc_pre_broadcast(
    residual: torch.Tensor,
    fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    rms_eps: float,
    hc_pre_eps: float,
    hc_sinkhorn_eps: float,
    hc_post_mult_value: float,
    sinkhorn_repeat: int,
    n_splits: int = 1,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    fn_broadcast: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-layer mHC pre of a token embedding `residual [T, H]` copied into all `m` streams.

    Returns `(streams [T, m, H], post_mix [T, m, 1], comb_mix [T, m, m], layer_input [T, H])`. The gates
    project the embedding with `fn_broadcast [m(m+2), H]` (fn's `m` column blocks summed, which is what fn
    does to `m` equal streams); the layer input is `sum_i pre_i * residual`, rounded to the stream dtype and
    RMS-normalised with `norm_weight` (its mean of squares taken before the rounding).
    """
    if norm_weight is None or fn_broadcast is None:
        raise ValueError("mhc_pre_broadcast needs norm_weight and fn_broadcast")
    if residual.dim() != 2:
        raise ValueError(f"mhc_pre_broadcast takes residual [T, H], got shape {tuple(residual.shape)}")
    del n_splits  # a CUDA work split: the result does not depend on it
    tokens, hidden = residual.shape
    hc_mult = fn.shape[1] // hidden
    streams = residual.unsqueeze(1).expand(tokens, hc_mult, hidden).contiguous()
    # The delayed pre projects `x` instead of the streams, and returns this layer's pre gates; its own
    # layer input (stream 0, as no gates are carried in) is not the one wanted here.
    post_mix, comb_mix, _, pre_mix = torch.ops.vllm.mhc_pre_delayed_tilelang(
        streams, fn_broadcast, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
        sinkhorn_repeat, None, residual, None, norm_eps,
    )
    collapsed = (pre_mix.unsqueeze(-1) * streams.float()).sum(1)
    rounded = collapsed.to(residual.dtype)
    inverse_rms = torch.rsqrt(collapsed.square().mean(-1, keepdim=True) + norm_eps)
    weight = norm_weight.to(residual.dtype).float()
    layer_input = (rounded.float() * inverse_rms * weight).to(residual.dtype)
    return streams, post_mix, comb_mix, layer_input
