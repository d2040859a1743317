"""vLLM's engine serving the tiny DeepSeek-V4 checkpoint on this CPU: vLLM's CPU port (the hand-written path) and
its NVIDIA model through dsv4_xpu, with Inductor (the default) and with the rewritten graphs run without it,
side by side in one run: load time, first generate (compiles), steady tokens/s, time per step, and the
steady step with a KV cache 4x larger (it must not grow with the cache).

    python -m benchmarks.bench_vllm_engine [--max-tokens 8] [--repeats 2]

Writes benchmarks/results/vllm_engine.json. vLLM's CPU port runs only where vLLM has its DeepSeek-V4 CPU kernels
(its AVX-512 BF16 library); elsewhere its row says why it is missing.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.common import print_table, write_results

PROMPTS = [[(5 * i + 3) % 256 for i in range(7)], [(11 * i + 1) % 256 for i in range(33)],
           [(7 * i) % 256 for i in range(130)]]
CONFIGS = [("cpu-port", None), ("nvidia", None), ("nvidia", {"inductor": False})]


def run(path: str, options: dict | None, model: str, max_tokens: int, repeats: int, kv_mib: int) -> dict:
    import json
    import os

    from dsv4_compile.tools.vllm_engine import run_engine

    saved = os.environ.get("DSV4_COMPILE_OPTIONS")
    os.environ["DSV4_COMPILE_OPTIONS"] = json.dumps(options) if options else ""
    try:
        result = run_engine(path, model, PROMPTS, max_tokens, phases=("batched",) * (1 + repeats),
                            kv_cache_bytes=kv_mib << 20)
    finally:
        os.environ.pop("DSV4_COMPILE_OPTIONS") if saved is None else os.environ.update(DSV4_COMPILE_OPTIONS=saved)
    steady = result["runs"][1:]
    seconds = min(r["seconds"] for r in steady)
    tokens = steady[0]["tokens"]
    return {"path": path if not options else f"{path} {json.dumps(options)}", "kv_cache_MiB": kv_mib,
            "load_s": result["load_seconds"], "first_generate_s": result["runs"][0]["seconds"],
            "steady_s": seconds, "tokens_per_s": tokens / seconds, "steps": max_tokens,
            "ms_per_step": 1e3 * seconds / max_tokens, "graphs": result["dynamo_total"]["unique_graphs"],
            "graph_breaks": result["dynamo_total"]["graph_breaks"], "recompiles": result["dynamo_total"]["recompiles"],
            "tokens": [r["tokens"] for r in steady[0]["results"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from dsv4_compile.tools.vllm_checkpoint import write_tiny_checkpoint
    from dsv4_compile.tools.vllm_demo import _cpu_port_unavailable

    model = str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-dsv4-")))
    rows, missing = [], _cpu_port_unavailable()
    for path, options in CONFIGS:
        if path == "cpu-port" and missing:
            rows.append({"path": path, "missing": missing})
            continue
        for kv_mib in (64, 256):
            rows.append(run(path, options, model, args.max_tokens, args.repeats, kv_mib))
    reference = next((r for r in rows if r["path"] == "cpu-port" and "tokens_per_s" in r), None)
    for row in rows:
        if reference and "tokens_per_s" in row:
            row["slowdown_vs_cpu_port"] = reference["tokens_per_s"] / row["tokens_per_s"]
    print_table(rows, ["path", "kv_cache_MiB", "load_s", "first_generate_s", "tokens_per_s", "ms_per_step",
                       "graphs", "graph_breaks", "recompiles", "slowdown_vs_cpu_port"])
    write_results("vllm_engine", rows, {"prompts": [len(p) for p in PROMPTS], "max_tokens": args.max_tokens,
                                        "cpu": {"avx512": torch.cpu._is_avx512_supported(),
                                                "avx512_bf16": torch.cpu._is_avx512_bf16_supported()},
                                        "note_cpu": "CPU numbers (this machine), not GPU or XPU measurements"})


if __name__ == "__main__":
    main()
