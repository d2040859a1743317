"""Compile cost: the rewrite pipeline's time against graph size, and its share of total compile time.

    python -m benchmarks.bench_compile_cost  (CPU is fine; writes results/compile_cost.json and .png)

The CUDA-oriented DeepSeek-V4 prefill graph at tiny() widths with 1, 4, 16 and 43 layers. Every size gets
Dynamo's trace and the rewrite pipeline; Inductor (C++ on CPU) runs for the sizes in INDUCTOR_LAYERS only,
since its time grows far past the others'.
"""

from __future__ import annotations

import sys
import time

import torch

import dsv4_compile
from benchmarks.common import plot, print_table, write_results
from dsv4_compile.lowering.pipeline import run_pipeline
from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model
from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4

LAYERS = (1, 4, 16, 43)
INDUCTOR_LAYERS = (1, 4)
TOKENS = 32


def measure(layers: int, with_inductor: bool) -> dict:
    torch._dynamo.reset()
    base = DeepseekV4Config.tiny()
    ratios = (base.compress_ratios * 43)[:layers]
    config = base.with_(num_hidden_layers=layers, compress_ratios=ratios)
    model = DeepseekV4Model(config, dtype=torch.float32)
    with dsv4_compile.cuda_compat("cpu"):
        cuda_model = CudaDeepseekV4(model)
    times: dict[str, float] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        times["backend_entered"] = time.perf_counter()
        report = run_pipeline(gm, torch.device("cpu"))
        times["pipeline_s"] = sum(s.ms for s in report.passes) / 1e3
        times["nodes"] = report.nodes_before
        if not with_inductor:
            return gm
        from torch._inductor.compile_fx import compile_fx

        start = time.perf_counter()
        compiled = compile_fx(gm, example_inputs)
        times["inductor_s"] = time.perf_counter() - start
        return compiled

    ids = torch.randint(0, config.vocab_size, (TOKENS,))
    start = time.perf_counter()
    with dsv4_compile.cuda_compat("cpu"), torch.no_grad():
        torch.compile(cuda_model.prefill, backend=backend)(ids)
    total = time.perf_counter() - start
    row = {"layers": layers, "nodes": times["nodes"], "dynamo_s": times["backend_entered"] - start,
           "pipeline_s": times["pipeline_s"], "inductor_s": times.get("inductor_s")}
    if with_inductor:
        row["total_s"] = total
        row["pipeline_share_pct"] = 100 * row["pipeline_s"] / total
    else:
        row["pipeline_share_of_dynamo_pct"] = 100 * row["pipeline_s"] / (row["dynamo_s"] + row["pipeline_s"])
    return row


def main() -> None:
    rows = [measure(n, n in INDUCTOR_LAYERS) for n in LAYERS]
    print_table(rows, ["layers", "nodes", "dynamo_s", "pipeline_s", "inductor_s", "total_s", "pipeline_share_pct",
                       "pipeline_share_of_dynamo_pct"])
    write_results("compile_cost", rows)
    plot("compile_cost", rows, "layers", ["dynamo_s", "pipeline_s"], ylabel="seconds", logx=False)


if __name__ == "__main__":
    sys.exit(main())
