"""mHC family, vLLM's NVIDIA ops (`vllm::*_tilelang`, registered by vLLM from Python).

Same math as lowerings/mhc.py, with vLLM's argument names and output layouts:
  - two eps values: `hc_pre_eps` is added to the pre gates, `hc_sinkhorn_eps` is used inside Sinkhorn;
    `hc_post_mult_value` scales the post gates; `sinkhorn_repeat` counts Sinkhorn rounds (at least one
    column normalisation always happens, as in the kernels);
  - post gates come back as `[..., m, 1]`, mixing matrices as `[..., m, m]`;
  - `norm_weight` fuses the next RMSNorm into the collapsed layer input: the collapse is computed in fp32,
    rounded to the stream dtype, then scaled by `rsqrt(mean(collapse^2) + norm_eps) * norm_weight` in fp32
    and rounded once. The mean of squares is that of the fp32 collapse in the plain and fused pre, that of
    the rounded collapse in the delayed ones (as their kernels do);
  - delayed variants collapse with the pre gates carried from the previous sub-layer (`pre_mix`; stream 0
    when None) and return this sub-layer's pre gates `[T, m]` for the next one.
Stream values come back in the stream's dtype (the kernels only take bf16, where that is their dtype).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.lowerings.mhc import (
    collapse,
    expand,
    fused_gates_and_collapse,
    mixing_weights,
    triton_kernels_for,
)
from dsv4_compile.lowering.registry import native_lowering


def check_gate_arguments(
    residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
    norm_weight: torch.Tensor | None = None, x: torch.Tensor | None = None, pre_mix: torch.Tensor | None = None,
    **_: object,
) -> None:
    """The pre kernels' contract on the projection and norm operands; raises ValueError with what is wrong."""
    if residual.dim() < 3:
        raise ValueError(f"residual must be [..., m, H], got shape {tuple(residual.shape)}")
    m, hidden = residual.shape[-2:]
    mixes = m * (m + 2)
    input_size = m * hidden if x is None else x.shape[-1]
    if tuple(fn.shape) != (mixes, input_size):
        raise ValueError(f"fn has shape {tuple(fn.shape)}, expected {(mixes, input_size)} for m={m}")
    if x is not None and input_size % m:
        raise ValueError(f"the projection input's width {input_size} is not a multiple of m={m}")
    if hc_scale.numel() != 3 or hc_base.numel() != mixes:
        raise ValueError(f"hc_scale/hc_base have {hc_scale.numel()}/{hc_base.numel()} values, expected 3/{mixes}")
    if norm_weight is not None and tuple(norm_weight.shape) != (hidden,):
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)}, expected {(hidden,)}")
    if pre_mix is not None and tuple(pre_mix.shape) != (*residual.shape[:-1],):
        raise ValueError(f"pre_mix has shape {tuple(pre_mix.shape)}, expected {tuple(residual.shape[:-1])}")


def check_fused_arguments(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
    fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_weight: torch.Tensor | None = None,
    pre_mix: torch.Tensor | None = None, **_: object,
) -> None:
    """The fused post + pre kernels' contract: the post operands fit the streams, then the pre's contract."""
    check_gate_arguments(residual, fn, hc_scale, hc_base, norm_weight=norm_weight, pre_mix=pre_mix)
    outer, m = tuple(residual.shape[:-2]), residual.shape[-2]
    if tuple(x.shape) != (*outer, residual.shape[-1]):
        raise ValueError(f"x has shape {tuple(x.shape)}, expected {(*outer, residual.shape[-1])}")
    if tuple(post_layer_mix.shape) not in ((*outer, m), (*outer, m, 1)):
        raise ValueError(f"post_layer_mix has shape {tuple(post_layer_mix.shape)}, expected {(*outer, m, 1)}")
    if tuple(comb_res_mix.shape) != (*outer, m, m):
        raise ValueError(f"comb_res_mix has shape {tuple(comb_res_mix.shape)}, expected {(*outer, m, m)}")


def check_head_arguments(hs_flat: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                         **_: object) -> None:
    """The head kernel's contract: `[T, m, H]` stream, `m` gates."""
    if hs_flat.dim() != 3:
        raise ValueError(f"hs_flat must be [T, m, H], got shape {tuple(hs_flat.shape)}")
    m, hidden = hs_flat.shape[1:]
    if tuple(fn.shape) != (m, m * hidden) or hc_scale.numel() != 1 or hc_base.numel() != m:
        raise ValueError(f"fn/hc_scale/hc_base have shapes {tuple(fn.shape)}/{tuple(hc_scale.shape)}/"
                         f"{tuple(hc_base.shape)}, expected {(m, m * hidden)}/(1,)/{(m,)}")


def _gates(
    residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    projected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(pre, post, comb)` in fp32 from the projection of `projected` (default: the flattened streams)."""
    m = residual.shape[-2]
    # mixing_weights flattens its last two dims; a [.., m, K/m] view of the projection input flattens back to it
    source = residual if projected is None else projected.unflatten(-1, (m, -1))
    return mixing_weights(source, fn, hc_scale, hc_base, rms_eps=rms_eps, pre_eps=hc_pre_eps,
                          sinkhorn_eps=hc_sinkhorn_eps, post_multiplier=hc_post_mult_value,
                          sinkhorn_iters=max(sinkhorn_repeat, 1))


def _layer_input(collapsed: torch.Tensor, dtype: torch.dtype, norm_weight: torch.Tensor | None, norm_eps: float,
                 stats_after_rounding: bool) -> torch.Tensor:
    """The fp32 collapse rounded to `dtype`, RMS-normalised and weighted when `norm_weight` is given."""
    rounded = collapsed.to(dtype)
    if norm_weight is None:
        return rounded
    stats = rounded.float() if stats_after_rounding else collapsed
    inverse_rms = torch.rsqrt(stats.square().mean(-1, keepdim=True) + norm_eps)
    return (rounded.float() * inverse_rms * norm_weight.to(dtype).float()).to(dtype)


@native_lowering("vllm::mhc_pre_tilelang", family="mhc", check=check_gate_arguments, ignores=("n_splits",))
def mhc_pre_tilelang_native(
    residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(post_mix [..., m, 1], comb_mix [..., m, m], layer_input [..., H])` for `residual [..., m, H]`."""
    outer, (m, hidden) = residual.shape[:-2], residual.shape[-2:]
    streams = residual.reshape(-1, m, hidden)
    kernels = triton_kernels_for(streams, fn)
    if kernels is not None:
        post, comb, _, layer_input = fused_gates_and_collapse(
            kernels, streams.flatten(-2), streams, fn, hc_scale, hc_base, rms_eps=rms_eps, pre_eps=hc_pre_eps,
            sinkhorn_eps=hc_sinkhorn_eps, post_multiplier=hc_post_mult_value, sinkhorn_iters=max(sinkhorn_repeat, 1),
            norm_weight=norm_weight, norm_eps=norm_eps)
        return post.reshape(*outer, m, 1), comb.reshape(*outer, m, m), layer_input.reshape(*outer, hidden)
    pre, post, comb = _gates(streams, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                             hc_post_mult_value, sinkhorn_repeat)
    layer_input = _layer_input(collapse(pre, streams.float()), residual.dtype, norm_weight, norm_eps,
                               stats_after_rounding=False)
    return post.reshape(*outer, m, 1), comb.reshape(*outer, m, m), layer_input.reshape(*outer, hidden)


@native_lowering("vllm::mhc_post_tilelang", family="mhc")
def mhc_post_tilelang_native(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
) -> torch.Tensor:
    """The new streams `[..., m, H]`: `post_j x + sum_i comb_ij residual_i` (post as `[..., m, 1]` or `[..., m]`)."""
    m, hidden = residual.shape[-2:]
    streams = residual.reshape(-1, m, hidden)
    new = expand(x.reshape(-1, hidden), streams, post_layer_mix.reshape(-1, m), comb_res_mix.reshape(-1, m, m))
    return new.reshape(residual.shape)


@native_lowering("vllm::mhc_fused_post_pre_tilelang", family="mhc", check=check_fused_arguments,
                 ignores=("n_splits", "tile_n"))
def mhc_fused_post_pre_tilelang_native(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
    fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float, hc_pre_eps: float,
    hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(residual_cur, post_mix, comb_mix, layer_input)`: this sub-layer's post, then the next one's pre on
    the new streams as rounded to the stream dtype (the CUDA kernel's small-batch path projects them before
    rounding: a difference below the projection's TF32 error there)."""
    residual_cur = mhc_post_tilelang_native(x, residual, post_layer_mix, comb_res_mix)
    return (residual_cur, *mhc_pre_tilelang_native(
        residual_cur, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
        sinkhorn_repeat, norm_weight, norm_eps))


@native_lowering("vllm::hc_head_fused_kernel_tilelang", family="mhc", check=check_head_arguments)
def hc_head_fused_kernel_tilelang_native(
    hs_flat: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_eps: float,
) -> torch.Tensor:
    """`[T, H]`: the streams collapsed with `m` gates `sigmoid(rms-normed projection * scale + base) + hc_eps`."""
    kernels = triton_kernels_for(hs_flat, fn)
    if kernels is not None:
        return fused_gates_and_collapse(kernels, hs_flat.flatten(-2), hs_flat, fn, hc_scale, hc_base,
                                        rms_eps=rms_eps, pre_eps=hc_eps, head=True)[3]
    flat = hs_flat.flatten(-2).float()
    logits = (flat @ fn.float().t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    gates = torch.sigmoid(logits * hc_scale.float() + hc_base.float()) + hc_eps
    return collapse(gates, hs_flat)


@native_lowering("vllm::mhc_pre_delayed_tilelang", family="mhc", check=check_gate_arguments)
def mhc_pre_delayed_tilelang_native(
    residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    pre_mix: torch.Tensor | None = None, x: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(post_mix [T, m, 1], comb_mix [T, m, m], layer_input [T, H], next_pre_mix [T, m])`.

    The gates come from projecting `x` (`[T, K]`, K = fn's width) when given, else the flattened streams;
    the layer input collapses `residual [T, m, H]` with the carried `pre_mix`, or is stream 0 without it.
    """
    m, hidden = residual.shape[-2:]
    streams = residual.reshape(-1, m, hidden)
    kernels = triton_kernels_for(streams, fn)
    if kernels is not None:
        source = streams.flatten(-2) if x is None else x.reshape(-1, x.shape[-1])
        post, comb, next_pre, layer_input = fused_gates_and_collapse(
            kernels, source, streams, fn, hc_scale, hc_base, rms_eps=rms_eps, pre_eps=hc_pre_eps,
            sinkhorn_eps=hc_sinkhorn_eps, post_multiplier=hc_post_mult_value, sinkhorn_iters=max(sinkhorn_repeat, 1),
            carried=None if pre_mix is None else pre_mix.reshape(-1, m), stream0=pre_mix is None,
            norm_weight=norm_weight, norm_eps=norm_eps, stats_after_rounding=True)
        outer = residual.shape[:-2]
        return (post.reshape(*outer, m, 1), comb.reshape(*outer, m, m), layer_input.reshape(*outer, hidden),
                next_pre.reshape(*outer, m))
    next_pre, post, comb = _gates(residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                                  hc_post_mult_value, sinkhorn_repeat, projected=x)
    if pre_mix is None:
        collapsed = residual[..., 0, :].float()
    else:
        collapsed = collapse(pre_mix.float().reshape(-1, m), residual.float().reshape(-1, m, hidden))
        collapsed = collapsed.reshape(*residual.shape[:-2], hidden)
    layer_input = _layer_input(collapsed, residual.dtype, norm_weight, norm_eps, stats_after_rounding=True)
    return post.unsqueeze(-1), comb, layer_input, next_pre


@native_lowering("vllm::mhc_fused_post_pre_delayed_tilelang", family="mhc", check=check_fused_arguments)
def mhc_fused_post_pre_delayed_tilelang_native(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
    fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float, hc_pre_eps: float,
    hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int, pre_mix: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6, capture_aux: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(residual_cur, post_mix, comb_mix, layer_input, next_pre_mix, aux)`: the post, then the delayed pre
    on the new streams. `aux` is the mean of the new streams `[T, H]` with `capture_aux`, else `[0, H]`."""
    residual_cur = mhc_post_tilelang_native(x, residual, post_layer_mix, comb_res_mix)
    post, comb, layer_input, next_pre = mhc_pre_delayed_tilelang_native(
        residual_cur, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value,
        sinkhorn_repeat, pre_mix, None, norm_weight, norm_eps)
    if capture_aux:
        aux = residual_cur.float().mean(-2).to(residual.dtype)
    else:
        aux = residual.new_empty((0, residual.shape[-1]))
    return residual_cur, post, comb, layer_input, next_pre, aux
