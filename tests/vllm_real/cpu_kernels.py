"""Whether vLLM's DeepSeek-V4 CPU kernels are loaded here, and the mark for tests that need them.

vLLM 0.32.0's CPU wheel ships three kernel libraries and loads one by the CPU's features
(platforms/cpu.py `import_kernels`): `_C` with AVX-512 BF16, `_C_AVX512` with AVX-512, `_C_AVX2` otherwise. Only
`_C` has the DeepSeek-V4 kernels (hc_pre_fused_cpu, fused_qnorm_rope_kv_insert_cpu, flash_mla_with_kvcache_cpu,
biased_topk_cpu, convert_weight_packed, ...). On a CPU without AVX-512 BF16 vLLM's CPU port, and every test
whose oracle is one of its kernels, cannot run: those tests skip, naming the reason. That is a fact of the
machine, not a missing install, so it holds under CI=true too; the tests run wherever the CPU has the features.
"""

from __future__ import annotations

import pytest
import torch

PROBE = "hc_pre_fused_cpu"


def vllm_cpu_kernels_loaded() -> bool:
    try:
        import vllm._custom_ops  # noqa: F401 - loads the kernel library this CPU gets
    except Exception:
        return False  # the tier's own import check reports this
    return hasattr(torch.ops._C, PROBE)


REASON = ("vLLM's DeepSeek-V4 CPU kernels (torch.ops._C." + PROBE + ", ...) are only in its AVX-512 BF16 library; "
          f"this CPU (AVX-512: {torch.cpu._is_avx512_supported()}, AVX-512 BF16: "
          f"{torch.cpu._is_avx512_bf16_supported()}) gets vLLM's AVX2/AVX-512 library, which has none of them, "
          "so vLLM's CPU port (this test's oracle) cannot run here")

needs_vllm_cpu_kernels = pytest.mark.skipif(not vllm_cpu_kernels_loaded(), reason=REASON)
