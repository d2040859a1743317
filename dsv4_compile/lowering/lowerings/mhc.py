"""mHC family: manifold-constrained hyper-connections. The residual stream is `h [T, m, H]`; a sub-layer
reads `x = sum_i pre_i h_i` and writes back `h'_j = post_j x' + sum_i comb_ij h_i`.

The weights come from one RMS-normalised projection of the flattened stream, split into `m` pre gates,
`m` post gates and an `m x m` mixing matrix that Sinkhorn iterations make (nearly) doubly stochastic.
All math in fp32; stream values are rounded back to the stream's dtype.
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering

POST_MULTIPLIER = 2.0


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


def collapse(pre: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`sum_i pre[:, i] h[:, i]`, in h's dtype."""
    return torch.einsum("tm,tmh->th", pre, h.float()).to(h.dtype)


def expand(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`out[:, j] = post[:, j] x + sum_i comb[:, i, j] h[:, i]`, in h's dtype."""
    mixed = torch.einsum("tij,tih->tjh", comb.float(), h.float())
    return (mixed + post.float().unsqueeze(-1) * x.float().unsqueeze(-2)).to(h.dtype)


@native_lowering("dsv4_cuda::mhc_pre")
def mhc_pre_native(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, rms_eps: float, hc_eps: float,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x [T, H], post [T, m], comb [T, m, m])`; one eps for the pre gate and Sinkhorn, post multiplier 2."""
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
    flat = h.flatten(-2).float()
    logits = (flat @ fn.float().t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + rms_eps)
    return collapse(torch.sigmoid(logits * scale.float() + base.float()) + hc_eps, h)
