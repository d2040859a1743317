"""Whole model: a Flash-shaped layer and the tiny() model, prefill and decode, four ways.

    python -m benchmarks.bench_layer [flash_layer] [tiny]   (on a CUDA GPU; default flash_layer; writes
                                                              results/layer.json and .png)

- eager_cuda:      the CUDA-oriented forward run eagerly (CUDA impls of the custom ops, streams, PDL Triton)
- eager_native:    the native oracle run eagerly (what the upstream XPU/ROCm path runs)
- inductor_native: stock torch.compile of the native oracle (prefill only: its Python-side caches make every
                   decode step a new graph, so there is no steady state to time)
- dsv4_xpu:        the CUDA-oriented static path compiled by the backend for `cuda` (Inductor's Triton path)
- dsv4_xpu_cudagraphs (decode): the same with the backend's `cudagraphs=True` (Inductor's cudagraph trees;
                   the cache tensors are marked static addresses, so their in-place writes are recorded)
Prefill rows carry the top-10 kernels by GPU time of dsv4_xpu and of inductor_native (torch.profiler).
NVIDIA numbers standing in for XPU, not XPU measurements.
Decode steps re-run at the same positions (the static path's writes are idempotent there); the oracle's
caches are cloned before each timed call, outside the timed region. bf16 weights; the Flash-shaped layer has
all real widths, compress ratio 4 (compressor + indexer), and 8 routed experts instead of 256 to fit the
dense-expert reference MoE. Kernel launches per forward from torch.profiler; peak memory per forward.
"""

from __future__ import annotations

import sys

import torch

import dsv4_compile
from benchmarks.common import bench_us, kernel_launches, plot, print_table, top_kernels, write_results
from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill
from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
from dsv4_compile.models.deepseek_v4.static_cache import (
    StaticCache,
    decode_inputs,
    mark_tokens_dynamic,
    prefill_inputs,
)

PREFILL_TOKENS = 4096
DECODE_BATCHES = (1, 8, 64)
CONFIGS = {
    "flash_layer": DeepseekV4Config.flash().with_(num_hidden_layers=1, compress_ratios=[4], n_routed_experts=8,
                                                  num_experts_per_tok=6, num_hash_layers=0),
    "tiny": DeepseekV4Config.tiny(),
}


def timed_with_setup(setup, fn, reps: int = 10) -> float:
    """Median microseconds of fn(setup()) with setup outside the CUDA-event-timed region."""
    times = []
    for i in range(reps + 2):
        arg = setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(1e3 * start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def mark_cache_static(cache: StaticCache) -> None:
    """The cache's tensors keep their addresses for the cache's life: a CUDA graph may write them in place."""
    for value in vars(cache).values():
        for tensor in value if isinstance(value, list) else [value]:
            if isinstance(tensor, torch.Tensor):
                torch._dynamo.mark_static_address(tensor)


def bench_config(name: str, cfg: DeepseekV4Config) -> list[dict]:
    torch._dynamo.reset()
    model = DeepseekV4Model(cfg, dtype=torch.bfloat16, device="cuda")
    cm = CudaDeepseekV4(model)
    slots = max(DECODE_BATCHES) + 1  # slot 0 holds the long prefill, decode uses slots 1..B
    cache = StaticCache(model, max_seq_len=PREFILL_TOKENS + 8, num_slots=slots)
    ids = torch.randint(0, cfg.vocab_size, (PREFILL_TOKENS,), device="cuda")
    rows = []
    with torch.no_grad():
        prefill_args = (ids, *prefill_inputs(cache, 0, PREFILL_TOKENS), cache)
        compiled_prefill = dsv4_compile.compile(cm.prefill_static, device="cuda", fullgraph=True)
        compiled_prefill(*mark_tokens_dynamic(*prefill_args[:3]), cache)
        stock_prefill = torch.compile(oracle_prefill)
        variants = {
            "eager_cuda": lambda: cm.prefill_static(*prefill_args),
            "eager_native": lambda: oracle_prefill(model, ids),
            "inductor_native": lambda: stock_prefill(model, ids),
            "dsv4_xpu": lambda: compiled_prefill(*prefill_args),
        }
        row = {"config": name, "mode": "prefill", "tokens": PREFILL_TOKENS}
        for variant, fn in variants.items():
            try:
                fn()
            except Exception as exc:
                row[f"{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            row[f"{variant}_us"] = bench_us(fn, warmup=2, reps=10)
            row[f"{variant}_kernels"] = kernel_launches(fn)
            row[f"{variant}_peak_MiB"] = peak_mib(fn)
        row["dsv4_vs_eager_native"] = row["eager_native_us"] / row["dsv4_xpu_us"]
        row["dsv4_vs_eager_cuda"] = row["eager_cuda_us"] / row["dsv4_xpu_us"]
        if "inductor_native_us" in row:
            row["dsv4_vs_inductor_native"] = row["inductor_native_us"] / row["dsv4_xpu_us"]
        row["dsv4_xpu_top10"] = top_kernels(variants["dsv4_xpu"])
        if "inductor_native_us" in row:
            row["inductor_native_top10"] = top_kernels(variants["inductor_native"])
        for variant in ("dsv4_xpu", "inductor_native"):
            for k in row.get(f"{variant}_top10", []):
                print(f"  {variant:16s} {k['us']:9.0f} us {100 * k['share']:5.1f}% x{k['calls']:<3d} {k['kernel']}")
        rows.append(row)
        # Fill every slot with a short history so decode has window and compressed entries to attend to.
        for slot in range(1, slots):
            cm.prefill_static(ids[:64], *prefill_inputs(cache, slot, 64), cache)
        oracle_cache = oracle_prefill(model, ids[:64])[1]
        compiled_decode = dsv4_compile.compile(cm.decode_static, device="cuda", fullgraph=True)
        mark_cache_static(cache)
        graphed_decode = dsv4_compile.compile(cm.decode_static, device="cuda", fullgraph=True, cudagraphs=True)
        for batch in DECODE_BATCHES:
            tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
            slot_ids = torch.arange(1, batch + 1)
            positions, slot_t = decode_inputs(cache, slot_ids)
            args = (tokens, positions, slot_t, cache)
            compiled_decode(*mark_tokens_dynamic(*args[:3]), cache)
            for _ in range(3):  # cudagraph trees record on a later call than the first
                graphed_decode(*args)
            row = {"config": name, "mode": "decode", "batch": batch}
            for variant, fn in {"eager_cuda": lambda a=args: cm.decode_static(*a),
                                "dsv4_xpu": lambda a=args: compiled_decode(*a),
                                "dsv4_xpu_cudagraphs": lambda a=args: graphed_decode(*a)}.items():
                row[f"{variant}_us"] = bench_us(fn, warmup=3, reps=20)
                row[f"{variant}_kernels"] = kernel_launches(fn)
                row[f"{variant}_peak_MiB"] = peak_mib(fn)
            row["eager_native_us"] = timed_with_setup(
                lambda b=batch: [oracle_cache.clone() for _ in range(b)],
                lambda caches, t=tokens: oracle_decode(model, t, caches))
            row["dsv4_vs_eager_native"] = row["eager_native_us"] / row["dsv4_xpu_us"]
            row["dsv4_vs_eager_cuda"] = row["eager_cuda_us"] / row["dsv4_xpu_us"]
            rows.append(row)
    return rows


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    for name in sys.argv[1:] or ["flash_layer"]:  # written after each config: a cut-short run keeps its rows
        rows += bench_config(name, CONFIGS[name])
        write_results("layer", rows)
    print_table(rows, ["config", "mode", "tokens", "batch", "eager_cuda_us", "eager_native_us", "inductor_native_us",
                       "dsv4_xpu_us", "dsv4_xpu_cudagraphs_us", "eager_cuda_kernels", "dsv4_xpu_kernels",
                       "dsv4_xpu_cudagraphs_kernels", "dsv4_vs_inductor_native", "dsv4_vs_eager_native"])
    plot("layer", [r for r in rows if r["mode"] == "decode" and r["config"] == "flash_layer"], "batch",
         ["eager_cuda_us", "eager_native_us", "dsv4_xpu_us", "dsv4_xpu_cudagraphs_us"],
         ylabel="us per decode step (Flash-shaped layer)")


if __name__ == "__main__":
    sys.exit(main())
