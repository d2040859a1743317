"""vLLM's platform, asked about the CUDA device, answers for the architecture whose code path is lowered.

vLLM's NVIDIA DeepSeek-V4 code asks `current_platform.get_device_capability()` to pick its kernels:
nvidia/model.py picks the FlashMLA attention for every major but 12 (12 picks FlashInfer SM120),
nvidia/ops/o_proj.py asserts a capability exists and takes its fp8 einsum recipe and scale layout from it,
sparse_mla.py and common/ops/fused_inv_rope_fp8_quant.py size buffers by it, and vllm/v1/attention/ops/flashmla.py
checks the Hopper/Blackwell families. On CPU and XPU the platform answers None, so the NVIDIA model cannot even
be built there.

The capability answered is 9.0 (Hopper): the FlashMLA path (FlashMLA sparse decode/prefill, block-row fp32
scales for the o_proj einsum, no SM120 adaptive-width decode) is the one whose ops dsv4_compile lowers.
`has_device_capability`, `is_device_capability` and `is_device_capability_family` follow, because vLLM's
Platform computes them from `get_device_capability`.

`current_platform.is_cuda()` stays False: vLLM keys CUDA-only entry points on it (the CuTe-DSL compressor
kernels, FlashMLA's and tilelang's CUDA imports), none of which exist off CUDA; with is_cuda() False it takes
the Triton/torch paths that dsv4_compile's substitutes and lowerings cover.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

LOWERED_CUDA_CAPABILITY = (9, 0)


@contextlib.contextmanager
def cuda_capability_of_lowered_path(capability: tuple[int, int] = LOWERED_CUDA_CAPABILITY) -> Iterator[None]:
    """Inside the block, where vLLM is loaded and its platform is not CUDA, the platform's
    `get_device_capability()` answers `capability`; restored on exit. Elsewhere it changes nothing."""
    platforms = sys.modules.get("vllm.platforms")
    if platforms is None:
        yield
        return
    platform = platforms.current_platform
    if platform.is_cuda():
        yield
        return
    from vllm.platforms.interface import DeviceCapability

    platform_class = type(platform)
    own = platform_class.__dict__.get("get_device_capability")
    answer = DeviceCapability(*capability)

    def get_device_capability(cls: type, device_id: int = 0) -> DeviceCapability:
        return answer

    platform_class.get_device_capability = classmethod(get_device_capability)
    try:
        yield
    finally:
        if own is None:
            del platform_class.get_device_capability
        else:
            platform_class.get_device_capability = own
