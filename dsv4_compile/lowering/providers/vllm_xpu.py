"""vllm-xpu-kernels (the `_xpu_C` library vLLM's XPU build loads) as providers on XPU.

Written from the op's schema as vLLM's XPU code calls it (`_xpu_C::mhc_post(x, residual, post_layer_mix,
comb_res_mix) -> Tensor`, the streams `[..., m, H]`); never run on an Intel GPU, so used only when the option
`providers` names "vllm-xpu".
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.kernel_providers import kernel_provider


@kernel_provider("vllm::mhc_post_tilelang", name="vllm-xpu", device="xpu", kernel="_xpu_C::mhc_post",
                 untested="no Intel GPU where it was written; from the op's schema only")
def mhc_post_vllm_xpu(
    x: torch.Tensor, residual: torch.Tensor, post_layer_mix: torch.Tensor, comb_res_mix: torch.Tensor,
) -> torch.Tensor:
    return torch.ops._xpu_C.mhc_post(x, residual, post_layer_mix, comb_res_mix)
