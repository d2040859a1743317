"""Manifold-constrained hyper-connections (mHC): the residual stream is ``h [T, m, H]``. fp32 math."""

from __future__ import annotations

import torch

POST_ALPHA = 2.0


def _rms_scale(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


def sinkhorn(comb_logits: torch.Tensor, hc_eps: float, iters: int) -> torch.Tensor:
    """``[T, m, m]`` logits -> approximately doubly stochastic mixing: row softmax (+eps), a column
    normalisation, then ``iters - 1`` rounds of (row, column) normalisation."""
    comb = comb_logits.softmax(-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return comb


def mhc_weights(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    rms_eps: float, hc_eps: float, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pre [T, m]``, ``post [T, m]``, ``comb [T, m, m]`` (fp32) of a sub-layer from ``h [T, m, H]``:
    an RMS-normalised projection ``mix = rmsnorm(h.view(T, m*H)) @ fn.T``, split in three, scaled
    by ``scale[0..2]``, shifted by ``base``; pre = sigmoid + eps, post = 2 sigmoid, comb = sinkhorn."""
    t, m, _ = h.shape
    xf = h.flatten(1).float()
    mix = (xf @ fn.float().T) * _rms_scale(xf, rms_eps)
    scale, base = scale.float(), base.float()
    pre = torch.sigmoid(mix[:, :m] * scale[0] + base[:m]) + hc_eps
    post = torch.sigmoid(mix[:, m:2 * m] * scale[1] + base[m:2 * m]) * POST_ALPHA
    comb_logits = mix[:, 2 * m:].view(t, m, m) * scale[2] + base[2 * m:].view(m, m)
    return pre, post, sinkhorn(comb_logits, hc_eps, iters)


def mhc_pre(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    rms_eps: float, hc_eps: float, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-layer input ``x = sum_i pre[:, i] h[:, i]`` (``[T, H]``, ``h.dtype``), with the ``post``
    ``[T, m]`` and ``comb`` ``[T, m, m]`` (fp32) that ``mhc_post`` needs afterwards."""
    pre, post, comb = mhc_weights(h, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters)
    x = (pre[..., None] * h.float()).sum(1).to(h.dtype)
    return x, post, comb


def mhc_post(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream ``out[:, j] = post[:, j] x + sum_i comb[:, i, j] h[:, i]`` (``[T, m, H]``, h.dtype)."""
    out = post[..., None] * x.float()[:, None, :] + torch.einsum("tij,tih->tjh", comb, h.float())
    return out.to(h.dtype)


def mhc_fused_post_pre(
    x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
    fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    rms_eps: float, hc_eps: float, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mhc_post`` of one sub-layer followed by ``mhc_pre`` of the next:
    returns ``(h_new, x_next, post_next, comb_next)``."""
    h_new = mhc_post(x, h, post, comb)
    x_next, post_next, comb_next = mhc_pre(h_new, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters)
    return h_new, x_next, post_next, comb_next


def hc_head(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
    rms_eps: float, hc_eps: float,
) -> torch.Tensor:
    """Collapse the stream before the final norm: ``pre = sigmoid(rmsnorm(h.view(T, m*H)) @ fn.T *
    scale + base) + eps``; returns ``sum_i pre[:, i] h[:, i]`` (``[T, H]``, h.dtype)."""
    xf = h.flatten(1).float()
    mix = (xf @ fn.float().T) * _rms_scale(xf, rms_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre[..., None] * h.float()).sum(1).to(h.dtype)
