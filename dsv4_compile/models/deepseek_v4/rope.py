"""Rotary embeddings of DeepSeek-V4: GPT-J interleaved pairs on the LAST ``rope_dim`` dims, YaRN."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import DeepseekV4Config


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``[dim // 2]`` (fp32) of a rotary embedding of width ``dim``.

    Plain: ``base ** (-2i / dim)``. With a YaRN ``rope_scaling`` (factor s, original context O,
    beta_fast, beta_slow): dims that turn more than beta_fast times over O keep their frequency, dims
    that turn less than beta_slow times are divided by s, and a linear ramp blends in between. The
    ramp bounds are the (floor / ceil of the) dims ``dim * ln(O / (2 pi beta)) / (2 ln base)``.
    No attention rescaling (mscale off).
    """
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if rope_scaling is None or rope_scaling.get("type", rope_scaling.get("rope_type")) != "yarn":
        return inv.float()
    factor = float(rope_scaling["factor"])
    orig = float(rope_scaling["original_max_position_embeddings"])

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(float(rope_scaling["beta_fast"]))), 0)
    high = min(math.ceil(corr_dim(float(rope_scaling["beta_slow"]))), dim - 1)
    span = high - low if high > low else 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
    return (inv / factor * ramp + inv * (1 - ramp)).float()


def layer_inv_freq(config: DeepseekV4Config, compress_ratio: int) -> torch.Tensor:
    """Inverse frequencies of a layer: window-only layers use ``rope_theta`` unscaled, compressed
    layers (ratio > 0, including their compressor and indexer) ``compress_rope_theta`` with YaRN."""
    if compress_ratio:
        return yarn_inv_freq(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling)
    return yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, None)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of the angles ``positions[t] * inv_freq[i]``, each ``[T, rope_dim // 2]`` fp32."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
    return ang.cos(), ang.sin()


def rope_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last ``2 * cos.shape[-1]`` dims of ``x [T, ..., D]`` by token ``t``'s angles.

    Pairs ``(e, o) = (x[2i], x[2i+1])`` of that slice become ``(e cos - o sin, o cos + e sin)``;
    ``inverse`` flips the sign of sin. Math in fp32, result in ``x.dtype``.
    """
    half = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    # reshape, not unflatten: Dynamo cannot trace Tensor.unflatten under a torch-function mode (cuda_compat)
    pairs = x[..., x.shape[-1] - 2 * half:].float().reshape(*x.shape[:-1], half, 2)
    e, o = pairs[..., 0], pairs[..., 1]
    rot = torch.stack((e * c - o * s, o * c + e * s), dim=-1).reshape(*x.shape[:-1], 2 * half)
    return torch.cat((x[..., : x.shape[-1] - 2 * half], rot.to(x.dtype)), dim=-1)
