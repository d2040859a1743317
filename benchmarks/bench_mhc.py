"""mHC pre / post / fused post-pre / hc_head (Flash width, hc_mult 4): eager native vs compiled.

    python benchmarks/bench_mhc.py           (on a CUDA GPU; writes results/mhc.json and .png)

"eager_native" is the torch math the upstream native path runs; "dsv4_xpu" compiles the CUDA-oriented call
of the fused op through the backend (which rewrites it to that math, then Inductor fuses it).
Kernel launches per call come from torch.profiler.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import bench_us, kernel_launches, plot, print_table, write_results
from dsv4_compile.models.deepseek_v4 import (
    cuda_ops,  # noqa: F401 - defines the dsv4_cuda ops
    mhc,
)

HIDDEN, M, ITERS, EPS = 4096, 4, 20, 1e-6
TOKENS = (1, 8, 64, 4096)


def make_inputs(tokens: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)
    return {
        "h": rnd(tokens, M, HIDDEN, dtype=torch.bfloat16), "x": rnd(tokens, HIDDEN, dtype=torch.bfloat16),
        "fn": rnd(M * (M + 2), M * HIDDEN, scale=0.01), "scale": rnd(3, scale=0.1), "base": rnd(M * (M + 2)),
        "post": rnd(tokens, M).sigmoid() * 2, "comb": rnd(tokens, M, M).softmax(-1),
    }


def native_fns() -> dict:
    kw = {"rms_eps": EPS, "hc_eps": EPS}
    return {
        "pre": lambda a: mhc.mhc_pre(a["h"], a["fn"], a["scale"], a["base"], iters=ITERS, **kw),
        "post": lambda a: mhc.mhc_post(a["x"], a["h"], a["post"], a["comb"]),
        "fused_post_pre": lambda a: mhc.mhc_fused_post_pre(a["x"], a["h"], a["post"], a["comb"], a["fn"],
                                                           a["scale"], a["base"], iters=ITERS, **kw),
        "hc_head": lambda a: mhc.hc_head(a["h"], a["fn"][:M], a["scale"][:1], a["base"][:M], **kw),
    }


def cuda_fns() -> dict:
    ops = torch.ops.dsv4_cuda
    return {
        "pre": lambda a: ops.mhc_pre(a["h"], a["fn"], a["scale"], a["base"], EPS, EPS, ITERS),
        "post": lambda a: ops.mhc_post(a["x"], a["h"], a["post"], a["comb"]),
        "fused_post_pre": lambda a: ops.mhc_fused_post_pre(a["x"], a["h"], a["post"], a["comb"], a["fn"],
                                                           a["scale"], a["base"], EPS, EPS, ITERS),
        "hc_head": lambda a: ops.hc_head(a["h"], a["fn"][:M], a["scale"][:1], a["base"][:M], EPS, EPS),
    }


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64
    native, cuda = native_fns(), cuda_fns()
    rows = []
    for op in native:
        compiled = torch.compile(cuda[op], backend="dsv4_xpu", dynamic=False)
        stock = torch.compile(native[op], dynamic=False)
        for tokens in TOKENS:
            a = make_inputs(tokens)
            expected = native[op](a)
            torch.testing.assert_close(compiled(a), expected, rtol=2e-2, atol=2e-2)
            row = {"op": op, "T": tokens}
            for name, fn in (("eager_native", native[op]), ("inductor_native", stock), ("dsv4_xpu", compiled)):
                row[f"{name}_us"] = bench_us(lambda fn=fn, a=a: fn(a))
                row[f"{name}_kernels"] = kernel_launches(lambda fn=fn, a=a: fn(a))
            row["dsv4_vs_eager"] = row["eager_native_us"] / row["dsv4_xpu_us"]
            rows.append(row)
    print_table(rows, ["op", "T", "eager_native_us", "inductor_native_us", "dsv4_xpu_us", "eager_native_kernels",
                       "dsv4_xpu_kernels", "dsv4_vs_eager"])
    write_results("mhc", "python benchmarks/bench_mhc.py", rows)
    plot("mhc", [r for r in rows if r["op"] == "fused_post_pre"], "T", ["eager_native_us", "dsv4_xpu_us"],
         ylabel="us, fused post+pre (median)")


if __name__ == "__main__":
    sys.exit(main())
