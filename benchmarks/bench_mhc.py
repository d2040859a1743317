"""mHC pre / post / fused post+pre / hc_head and vLLM's variants at Flash width (hc_mult 4, hidden 4096).

    python -m benchmarks.bench_mhc           (on a CUDA GPU; writes results/mhc.json and .png)

Side by side in one run, each timed as plain calls (launch overhead included) and as a CUDA-graph replay:
- eager_native:    the plain torch math run eagerly (the model's mhc.py for the dsv4_cuda ops, the lowerings'
                   own torch path for vLLM's variants);
- inductor_native: stock torch.compile of that math;
- dsv4_xpu:        the CUDA-oriented op compiled by the backend (its two Triton kernels, inlined by Inductor);
                   vLLM's ops are not installed here, so their rows compile the lowering the backend emits;
- bound:           the bytes the op must move (streams in, streams/layer input out, fn) at the device-to-device
                   copy bandwidth measured in the same run.
No hand-fused kernel column: the tilelang kernels of the CUDA path are not installed here.
These are NVIDIA numbers standing in for XPU, not XPU measurements.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

import torch

from benchmarks.common import (
    bench_us,
    copy_bandwidth_gbs,
    graph_us,
    kernel_launches,
    plot,
    print_table,
    write_results,
)
from dsv4_compile.lowering.lowerings import mhc as mhc_lowering
from dsv4_compile.lowering.lowerings import mhc_vllm
from dsv4_compile.models.deepseek_v4 import (
    cuda_ops,  # noqa: F401 - defines the dsv4_cuda ops
    mhc,
)

HIDDEN, M, ITERS, EPS = 4096, 4, 20, 1e-6
MIXES = M * (M + 2)
TOKENS = (1, 8, 64, 4096, 16384)
VARIANTS = ("eager_native", "inductor_native", "dsv4_xpu")


def make_inputs(tokens: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return {
        "h": rnd(tokens, M, HIDDEN, dtype=torch.bfloat16), "x": rnd(tokens, HIDDEN, dtype=torch.bfloat16),
        "fn": rnd(MIXES, M * HIDDEN, scale=0.01), "scale": rnd(3, scale=0.1), "base": rnd(MIXES),
        "post": rnd(tokens, M).sigmoid() * 2, "comb": rnd(tokens, M, M).softmax(-1),
        "pre_mix": rnd(tokens, M).sigmoid(), "norm_weight": rnd(HIDDEN, dtype=torch.bfloat16),
    }


def stream_bytes(tokens: int, streams_in: int, streams_out: int, rows_in: int, rows_out: int, fn_rows: int) -> int:
    """bf16 `[T, m, H]` streams and `[T, H]` rows read/written, plus the fp32 projection weights."""
    stream, row = tokens * M * HIDDEN * 2, tokens * HIDDEN * 2
    return (streams_in + streams_out) * stream + (rows_in + rows_out) * row + fn_rows * M * HIDDEN * 4


@contextlib.contextmanager
def torch_math_only() -> Iterator[None]:
    """The lowerings' plain torch path on the GPU (what Inductor gets without the Triton kernels)."""
    saved = mhc_lowering.TRITON_DEVICES
    mhc_lowering.TRITON_DEVICES = ()
    try:
        yield
    finally:
        mhc_lowering.TRITON_DEVICES = saved


def in_torch_math(fn: Callable[[dict], object]) -> Callable[[dict], object]:
    """`fn` called with the lowerings' Triton path off (around the call, outside any compiled region)."""
    def run(a: dict) -> object:
        with torch_math_only():
            return fn(a)
    return run


def vllm_pre(a: dict) -> object:
    return mhc_vllm.mhc_pre_tilelang_native(a["h"], a["fn"], a["scale"], a["base"], EPS, EPS, EPS, 2.0, ITERS,
                                            a["norm_weight"], EPS)


def vllm_fused_delayed(a: dict) -> object:
    return mhc_vllm.mhc_fused_post_pre_delayed_tilelang_native(
        a["x"], a["h"], a["post"].unsqueeze(-1), a["comb"], a["fn"], a["scale"], a["base"], EPS, EPS, EPS, 2.0,
        ITERS, a["pre_mix"], a["norm_weight"], EPS)


def cases() -> dict[str, tuple[Callable, Callable, tuple[int, int, int, int, int]]]:
    """op -> (native math, CUDA-oriented call, (streams in, streams out, rows in, rows out, fn rows))."""
    ops, kw = torch.ops.dsv4_cuda, {"rms_eps": EPS, "hc_eps": EPS}
    return {
        "pre": (lambda a: mhc.mhc_pre(a["h"], a["fn"], a["scale"], a["base"], iters=ITERS, **kw),
                lambda a: ops.mhc_pre(a["h"], a["fn"], a["scale"], a["base"], EPS, EPS, ITERS), (1, 0, 0, 1, MIXES)),
        "post": (lambda a: mhc.mhc_post(a["x"], a["h"], a["post"], a["comb"]),
                 lambda a: ops.mhc_post(a["x"], a["h"], a["post"], a["comb"]), (1, 1, 1, 0, 0)),
        "fused_post_pre": (
            lambda a: mhc.mhc_fused_post_pre(a["x"], a["h"], a["post"], a["comb"], a["fn"], a["scale"], a["base"],
                                             iters=ITERS, **kw),
            lambda a: ops.mhc_fused_post_pre(a["x"], a["h"], a["post"], a["comb"], a["fn"], a["scale"], a["base"],
                                             EPS, EPS, ITERS), (1, 1, 1, 1, MIXES)),
        "hc_head": (lambda a: mhc.hc_head(a["h"], a["fn"][:M], a["scale"][:1], a["base"][:M], **kw),
                    lambda a: ops.hc_head(a["h"], a["fn"][:M], a["scale"][:1], a["base"][:M], EPS, EPS),
                    (1, 0, 0, 1, M)),
        "vllm_pre_normed": (vllm_pre, vllm_pre, (1, 0, 0, 1, MIXES)),
        "vllm_fused_post_pre_delayed": (vllm_fused_delayed, vllm_fused_delayed, (1, 1, 1, 1, MIXES)),
    }


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64
    copy_gbs = copy_bandwidth_gbs()
    only = sys.argv[1:] or None
    rows = []
    for op, (native, cuda_call, traffic) in cases().items():
        if only and op not in only:
            continue
        stock = torch.compile(native)
        if op.startswith("vllm"):  # the lowering itself: its torch path for the native rows, under stock Inductor
            native, stock = in_torch_math(native), in_torch_math(stock)
            dsv4 = torch.compile(cuda_call)
        else:
            dsv4 = torch.compile(cuda_call, backend="dsv4_xpu")
        for tokens in TOKENS:
            a = make_inputs(tokens)
            expected = native(a)
            torch.testing.assert_close(dsv4(a), expected, rtol=2e-2, atol=2e-2)
            row = {"op": op, "T": tokens, "bound_us": stream_bytes(tokens, *traffic) / (copy_gbs * 1e3)}
            for name, fn in zip(VARIANTS, (native, stock, dsv4), strict=True):
                call = functools.partial(fn, a)
                row[f"{name}_us"] = bench_us(call)
                row[f"{name}_graph_us"] = graph_us(call)
                row[f"{name}_kernels"] = kernel_launches(call)
            row["dsv4_vs_inductor"] = row["inductor_native_us"] / row["dsv4_xpu_us"]
            row["dsv4_graph_vs_bound"] = (row["dsv4_xpu_graph_us"] or float("nan")) / row["bound_us"]
            rows.append(row)
            print(op, tokens, {k: round(v, 1) for k, v in row.items() if isinstance(v, float)}, flush=True)
        write_results("mhc", rows, {"copy_GBps": copy_gbs})  # after each op: a cut-short run keeps its rows
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (NVIDIA numbers standing in for XPU)")
    print_table(rows, ["op", "T", "eager_native_us", "inductor_native_us", "dsv4_xpu_us", "inductor_native_graph_us",
                       "dsv4_xpu_graph_us", "bound_us", "inductor_native_kernels", "dsv4_xpu_kernels",
                       "dsv4_vs_inductor", "dsv4_graph_vs_bound"])
    write_results("mhc", rows, {"copy_GBps": copy_gbs})
    plot("mhc", [r for r in rows if r["op"] == "pre"], "T",
         ["eager_native_graph_us", "inductor_native_graph_us", "dsv4_xpu_graph_us", "bound_us"],
         ylabel="us per mHC pre, CUDA-graph replay (median)")


if __name__ == "__main__":
    sys.exit(main())
