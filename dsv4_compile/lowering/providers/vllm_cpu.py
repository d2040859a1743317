"""vLLM's CPU kernels (its `_C` library built with AVX-512 BF16) as providers of the mHC lowerings on CPU.

The kernels, from their schemas and how vLLM's CPU port calls them:
  - `hc_pre_fused_cpu(x [T, m, H], hc_fn, hc_scale, hc_base, hc_mult, sinkhorn_iters, rms_eps, hc_eps)`
    -> `(layer_input [T, H], post [T, m], comb [T, m, m])`: one eps for the pre gates and Sinkhorn, and a post
    multiplier fixed at 2; no fused RMSNorm (the CPU port normalises the layer input afterwards);
  - `hc_post_fused_cpu(x [T, H], residual [T, m, H], post [T, m] fp32, comb [T, m, m] fp32) -> [T, m, H]`;
  - `hc_head_fused_cpu(hs_flat [T, m, H], hc_fn, hc_scale, hc_base, hc_eps, norm_eps) -> [T, H]`.
The fused RMSNorm is applied here to the kernel's rounded layer input, with the statistics of that rounded
value, as the CPU port computes it (the native math takes them before rounding: a difference within bf16).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.kernel_providers import kernel_provider

UNTESTED = ("vLLM's AVX-512 BF16 CPU library does not load on the CPU these were written on (no AVX-512); "
            "tests/test_kernel_providers.py compares each with the native math where it loads")
POST_MULTIPLIER = 2.0


def accepts_pre(residual: torch.Tensor, hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float,
                **_: object) -> str | None:
    """What `hc_pre_fused_cpu` cannot express."""
    if residual.dtype != torch.bfloat16:
        return f"streams are {residual.dtype}; the kernel takes bf16"
    if hc_pre_eps != hc_sinkhorn_eps:
        return f"hc_pre_eps {hc_pre_eps} != hc_sinkhorn_eps {hc_sinkhorn_eps}; the kernel has one eps"
    if hc_post_mult_value != POST_MULTIPLIER:
        return f"hc_post_mult_value {hc_post_mult_value}; the kernel fixes it at {POST_MULTIPLIER}"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x
    scaled = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)
    return (scaled * weight.to(x.dtype).float()).to(x.dtype)


@kernel_provider("vllm::mhc_pre_tilelang", name="vllm-cpu", device="cpu", kernel="_C::hc_pre_fused_cpu",
                 accepts=accepts_pre, untested=UNTESTED)
def mhc_pre_vllm_cpu(
    residual: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_pre_eps: float, hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outer, (m, hidden) = residual.shape[:-2], residual.shape[-2:]
    layer_input, post, comb = torch.ops._C.hc_pre_fused_cpu(
        residual.reshape(-1, m, hidden), fn, hc_scale, hc_base, m, sinkhorn_repeat, rms_eps, hc_pre_eps)
    layer_input = _rms_norm(layer_input, norm_weight, norm_eps)
    return post.reshape(*outer, m, 1), comb.reshape(*outer, m, m), layer_input.reshape(*outer, hidden)


@kernel_provider("vllm::mhc_post_tilelang", name="vllm-cpu", device="cpu", kernel="_C::hc_post_fused_cpu",
                 untested=UNTESTED)
def mhc_post_vllm_cpu(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
) -> torch.Tensor:
    m, hidden = residual.shape[-2:]
    new = torch.ops._C.hc_post_fused_cpu(x.reshape(-1, hidden), residual.reshape(-1, m, hidden),
                                         post_layer_mix.reshape(-1, m).float(), comb_res_mix.reshape(-1, m, m).float())
    return new.reshape(residual.shape)


@kernel_provider("vllm::mhc_fused_post_pre_tilelang", name="vllm-cpu", device="cpu", kernel="_C::hc_pre_fused_cpu",
                 accepts=accepts_pre, untested=UNTESTED)
def mhc_fused_post_pre_vllm_cpu(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
    fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float, hc_pre_eps: float,
    hc_sinkhorn_eps: float, hc_post_mult_value: float, sinkhorn_repeat: int,
    norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    residual_cur = mhc_post_vllm_cpu(x, residual, post_layer_mix, comb_res_mix)
    return (residual_cur, *mhc_pre_vllm_cpu(residual_cur, fn, hc_scale, hc_base, rms_eps, hc_pre_eps,
                                            hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, norm_weight,
                                            norm_eps))


@kernel_provider("vllm::hc_head_fused_kernel_tilelang", name="vllm-cpu", device="cpu",
                 kernel="_C::hc_head_fused_cpu", untested=UNTESTED,
                 accepts=lambda hs_flat, **_: None if hs_flat.dtype == torch.bfloat16 else
                 f"streams are {hs_flat.dtype}; the kernel takes bf16")
def hc_head_vllm_cpu(
    hs_flat: torch.Tensor, fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, rms_eps: float,
    hc_eps: float,
) -> torch.Tensor:
    return torch.ops._C.hc_head_fused_cpu(hs_flat, fn, hc_scale, hc_base, hc_eps, rms_eps)
