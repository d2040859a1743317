"""mHC family: manifold-constrained hyper-connections. The residual stream is `h [T, m, H]`; a sub-layer
reads `x = sum_i pre_i h_i` and writes back `h'_j = post_j x' + sum_i comb_ij h_i`.

The weights come from one RMS-normalised projection of the flattened stream, split into `m` pre gates,
`m` post gates and an `m x m` mixing matrix that Sinkhorn iterations make (nearly) doubly stochastic.
All math in fp32; stream values are rounded back to the stream's dtype.

Formulated for fusion: the collapse and the expansion are written as sums over the `m` streams (pointwise
work Inductor fuses into one kernel; an einsum would become a batched matmul on an fp32 copy of the streams).
On a Triton device the projection, gates, Sinkhorn and collapse run as two Triton kernels (mhc_triton.py)
that Inductor inlines into its code; elsewhere the plain torch below.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Iterable

import torch
from torch.utils._triton import has_triton_package

from dsv4_compile.lowering.registry import native_lowering

POST_MULTIPLIER = 2.0
TRITON_DEVICES = ("cuda", "xpu")


if has_triton_package():
    from dsv4_compile.lowering.lowerings import mhc_triton as _triton_kernels
else:
    _triton_kernels = None


def triton_kernels_for(residual: torch.Tensor, fn: torch.Tensor) -> types.ModuleType | None:
    """The Triton kernel module when the mHC call on `residual [T, m, H]` can take it, else None: a Triton
    device, Triton importable, `m` a power of two, float streams, a 2-D projection, at least one token."""
    m = residual.shape[-2]
    if residual.device.type not in TRITON_DEVICES or residual.dim() != 3 or fn.dim() != 2 or m & (m - 1):
        return None
    if residual.shape[0] == 0:  # nothing to launch
        return None
    if residual.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    return _triton_kernels


def fused_gates_and_collapse(
    kernels: types.ModuleType, source: torch.Tensor, residual: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, *, rms_eps: float, pre_eps: float, sinkhorn_eps: float = 0.0,
    post_multiplier: float = 1.0, sinkhorn_iters: int = 1, head: bool = False, carried: torch.Tensor | None = None,
    stream0: bool = False, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
    stats_after_rounding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(post, comb, pre, collapsed)` as `mixing_weights` + `collapse` (+ the optional fused RMSNorm) compute
    them, gates projected from `source [T, K]`, through the Triton kernels."""
    if fn.shape[-1] != source.shape[-1]:  # the plain path's matmul would refuse it; the kernels would read past fn
        raise ValueError(f"fn has shape {tuple(fn.shape)}: its width must be the projected rows' {source.shape[-1]}")
    fn = fn.float().contiguous()
    partials = torch.ops.dsv4_triton.mhc_project(source.contiguous(), fn)
    mode = (kernels.COLLAPSE_STREAM0 if stream0 else kernels.COLLAPSE_WITH_CARRIED if carried is not None
            else kernels.COLLAPSE_WITH_GATES)
    return torch.ops.dsv4_triton.mhc_gates_collapse(
        partials, fn.shape[0], source.shape[-1], scale.float().contiguous(), base.float().contiguous(),
        residual.contiguous(), None if carried is None else carried.float().contiguous(),
        None if norm_weight is None else norm_weight.contiguous(), residual.dtype, rms_eps, pre_eps, sinkhorn_eps,
        post_multiplier, sinkhorn_iters, norm_eps, head, mode, stats_after_rounding)


def mixing_weights(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    rms_eps: float, pre_eps: float, sinkhorn_eps: float, post_multiplier: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(pre [T, m], post [T, m], comb [T, m, m])` in fp32 for the stream `h [T, m, H]`."""
    m = h.shape[-2]
    flat = h.flatten(-2).float()
    logits = (flat @ fn.float().t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    scale, base = scale.float(), base.float()
    pre_logits, post_logits, comb_logits = logits.split([m, m, m * m], dim=-1)
    pre = torch.sigmoid(pre_logits * scale[0] + base[:m]) + pre_eps
    post = torch.sigmoid(post_logits * scale[1] + base[m:2 * m]) * post_multiplier
    comb = torch.softmax((comb_logits * scale[2] + base[2 * m:]).unflatten(-1, (m, m)), dim=-1) + sinkhorn_eps
    for step in range(sinkhorn_iters):
        if step:  # the softmax already normalised the rows once
            comb = comb / (comb.sum(-1, keepdim=True) + sinkhorn_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + sinkhorn_eps)
    return pre, post, comb


def _sum_over_streams(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, terms)


def collapse(pre: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`sum_i pre[:, i] h[:, i]`, in h's dtype."""
    pre = pre.float()
    return _sum_over_streams(pre[:, i, None] * h[:, i].float() for i in range(h.shape[1])).to(h.dtype)


def expand(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`out[:, j] = post[:, j] x + sum_i comb[:, i, j] h[:, i]`, in h's dtype."""
    comb = comb.float()
    mixed = _sum_over_streams(comb[:, i, :, None] * h[:, i, None, :].float() for i in range(h.shape[1]))
    return (mixed + post.float().unsqueeze(-1) * x.float().unsqueeze(-2)).to(h.dtype)


@native_lowering("dsv4_cuda::mhc_pre")
def mhc_pre_native(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, rms_eps: float, hc_eps: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x [T, H], post [T, m], comb [T, m, m])`; one eps for the pre gate and Sinkhorn, post multiplier 2."""
    kernels = triton_kernels_for(h, fn)
    if kernels is not None:
        post, comb, _, x = fused_gates_and_collapse(
            kernels, h.flatten(-2), h, fn, scale, base, rms_eps=rms_eps, pre_eps=hc_eps, sinkhorn_eps=hc_eps,
            post_multiplier=POST_MULTIPLIER, sinkhorn_iters=iters)
        return x, post, comb
    pre, post, comb = mixing_weights(h, fn, scale, base, rms_eps=rms_eps, pre_eps=hc_eps, sinkhorn_eps=hc_eps,
                                     post_multiplier=POST_MULTIPLIER, sinkhorn_iters=iters)
    return collapse(pre, h), post, comb


@native_lowering("dsv4_cuda::mhc_post")
def mhc_post_native(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """The new stream `[T, m, H]`."""
    return expand(x, h, post, comb)


@native_lowering("dsv4_cuda::mhc_fused_post_pre")
def mhc_fused_post_pre_native(
    x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, rms_eps: float, hc_eps: float, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(h_new, x_next, post_next, comb_next)`: this sub-layer's post, then the next one's pre."""
    h_new = expand(x, h, post, comb)
    return (h_new, *mhc_pre_native(h_new, fn, scale, base, rms_eps, hc_eps, iters))


@native_lowering("dsv4_cuda::hc_head")
def hc_head_native(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, rms_eps: float, hc_eps: float,
) -> torch.Tensor:
    """Collapse the stream before the final norm with `m` sigmoid gates (+eps): `[T, H]`."""
    kernels = triton_kernels_for(h, fn)
    if kernels is not None:
        return fused_gates_and_collapse(kernels, h.flatten(-2), h, fn, scale, base, rms_eps=rms_eps,
                                        pre_eps=hc_eps, head=True)[3]
    flat = h.flatten(-2).float()
    logits = (flat @ fn.float().t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    return collapse(torch.sigmoid(logits * scale.float() + base.float()) + hc_eps, h)
