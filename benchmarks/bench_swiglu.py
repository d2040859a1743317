"""Clamped SwiGLU, bf16: eager native vs the fused CUDA op vs dsv4_xpu vs stock torch.compile.

    python -m benchmarks.bench_swiglu        (on a CUDA GPU; writes results/swiglu.json and .png)

Each row is measured side by side in one run, as plain calls and as CUDA-graph replays (`*_graph_us`), with
the GPU time of the kernels alone from the profiler (`*_kernel_us`); GB/s counts 6 bytes per output element
(read 2 bf16 inputs, write 1) over the graph replay time, "% copy" compares with a device-to-device copy
measured in the same run, and `bound_us` is that copy rate's time for those bytes. `fused_op` is the
hand-fused Triton kernel of the CUDA-oriented path. NVIDIA numbers standing in for XPU, not XPU measurements.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

import dsv4_compile  # noqa: F401 - defines _C::silu_and_mul_with_clamp
from benchmarks.common import bench_us, copy_bandwidth_gbs, graph_us, plot, print_table, top_kernels, write_results

LIMIT = 10.0
TOKENS = (1, 8, 64, 512, 4096, 16384)
INTERMEDIATE = (2048, 3072)


def eager_native(x: torch.Tensor) -> torch.Tensor:
    """The upstream XPU fallback."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d].clamp(max=LIMIT)) * x[..., d:].clamp(-LIMIT, LIMIT)


def cuda_oriented(x: torch.Tensor) -> torch.Tensor:
    """The CUDA path: fused out-parameter op into a fresh buffer."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul_with_clamp(out, x, LIMIT)
    return out


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64
    copy_gbs = copy_bandwidth_gbs()
    variants = {
        "eager_native": eager_native,
        "fused_op": cuda_oriented,
        "dsv4_xpu": torch.compile(cuda_oriented, backend="dsv4_xpu", dynamic=False),
        # the same without the kernel's rounding points (Inductor's config as it is): what they cost
        "dsv4_xpu_inexact": torch.compile(cuda_oriented, backend="dsv4_xpu", dynamic=False,
                                          options={"exact_rounding": False}),
        "inductor_native": torch.compile(eager_native, dynamic=False),
    }
    rows = []
    for inter in INTERMEDIATE:
        for tokens in TOKENS:
            x = (torch.randn(tokens, 2 * inter, device="cuda") * 4).to(torch.bfloat16)
            reference = cuda_oriented(x)
            row = {"I": inter, "T": tokens, "bound_us": 6 * tokens * inter / (copy_gbs * 1e3)}
            for name, fn in variants.items():
                torch.testing.assert_close(fn(x), reference, rtol=1.6e-2, atol=1.6e-2)
                call = functools.partial(fn, x)
                us, graphed = bench_us(call), graph_us(call)
                gbs = 6 * tokens * inter / ((graphed or us) * 1e-6) / 1e9
                row |= {f"{name}_us": us, f"{name}_graph_us": graphed, f"{name}_GBps": gbs,
                        f"{name}_pct_copy": 100 * gbs / copy_gbs,
                        f"{name}_kernel_us": sum(k["us"] for k in top_kernels(call, n=100))}
            row["dsv4_vs_eager"] = row["eager_native_us"] / row["dsv4_xpu_us"]
            row["dsv4_vs_fused"] = row["fused_op_us"] / row["dsv4_xpu_us"]
            row["dsv4_vs_inductor_graph"] = row["inductor_native_graph_us"] / row["dsv4_xpu_graph_us"]
            rows.append(row)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    print_table(rows, ["I", "T", "eager_native_us", "fused_op_us", "dsv4_xpu_us", "inductor_native_us",
                       "fused_op_graph_us", "dsv4_xpu_graph_us", "inductor_native_graph_us", "dsv4_xpu_kernel_us",
                       "dsv4_xpu_inexact_kernel_us", "inductor_native_kernel_us", "fused_op_kernel_us", "bound_us",
                       "dsv4_xpu_pct_copy", "dsv4_vs_inductor_graph"])
    write_results("swiglu", rows, {"copy_GBps": copy_gbs})
    plot("swiglu", [r for r in rows if r["I"] == 2048], "T",
         ["fused_op_graph_us", "dsv4_xpu_graph_us", "inductor_native_graph_us", "bound_us"],
         ylabel="us, CUDA-graph replay (I=2048, median)")


if __name__ == "__main__":
    sys.exit(main())
