"""DeepSeek-V4 features the NVIDIA path does not lower are refused when vLLM's engine builds the model, each named
with where it was set (integrations/vllm_model_support.py); nothing is compiled, no weight is read."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from dsv4_compile.tools.vllm_checkpoint import write_tiny_config
from dsv4_compile.tools.vllm_engine import engine_env

FP8_WITH_FP4_EXPERTS = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                        "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}


def build_engine(folder, **extra) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        from dsv4_compile.tools.vllm_engine import make_llm
        make_llm({str(folder)!r}, 64 << 20, load_format="dummy", **{extra!r})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=engine_env("nvidia"),
                          timeout=600)


def test_megamoe_fp4_experts_and_draft_heads_are_refused_at_load_each_named(tmp_path):
    folder = write_tiny_config(tmp_path, quantization_config=FP8_WITH_FP4_EXPERTS, expert_dtype="fp4")
    done = build_engine(folder, kernel_config={"moe_backend": "deep_gemm_mega_moe"},
                        speculative_config={"method": "deepseek_mtp", "num_speculative_tokens": 1})
    assert done.returncode != 0
    error = done.stderr
    assert "UnsupportedDeepseekV4Feature" in error and "does not cover" in error
    assert "MegaMoE experts: kernel_config.moe_backend='deep_gemm_mega_moe'" in error
    assert "quantization 'deepseek_v4_fp8', expert_dtype='fp4'" in error
    assert "draft heads: speculative_config.method='mtp'" in error
    # refused by the plugin before vLLM builds the model (vLLM itself would first ask for expert parallelism)
    assert "requires expert parallel" not in error
