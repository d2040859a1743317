"""The main job, shown: vLLM's engine serving DeepSeek-V4 on this CPU, its NVIDIA model through dsv4_xpu next to
vLLM's own CPU port, from one tiny random checkpoint (`dsv4-compile vllm-demo`, `make demo`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

PROMPTS = [[(5 * i + 3) % 256 for i in range(7)], [(11 * i + 1) % 256 for i in range(33)],
           [(7 * i) % 256 for i in range(130)]]


def _cpu_port_unavailable() -> str | None:
    """Why vLLM's CPU port cannot run on this CPU (its DeepSeek-V4 kernels are only in the AVX-512 BF16
    library), or None."""
    import torch

    if torch.cpu._is_avx512_bf16_supported():
        return None
    return ("vLLM 0.32.0 builds its DeepSeek-V4 CPU kernels only into its AVX-512 BF16 library; this CPU has "
            "no AVX-512 BF16, so vLLM's CPU port cannot run here")


def run_vllm_demo(max_tokens: int = 8, folder: str | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from dsv4_compile.tools.vllm_checkpoint import write_tiny_checkpoint
    from dsv4_compile.tools.vllm_engine import run_engine

    console = Console()
    model = Path(folder or tempfile.mkdtemp(prefix="tiny-dsv4-"))
    console.print(f"[bold]tiny DeepSeek-V4 checkpoint[/] (random weights, the checkpoint's names): {model}")
    write_tiny_checkpoint(model)
    results: dict[str, Any] = {}
    skipped = _cpu_port_unavailable()
    for path in ("nvidia", "cpu-port"):
        if path == "cpu-port" and skipped:
            console.print(f"[yellow]vLLM's CPU port skipped:[/] {skipped}")
            continue
        console.print(f"[bold]vLLM engine, {path} path[/] (first generate compiles; the second is timed)")
        results[path] = run_engine(path, model, PROMPTS, max_tokens, phases=("batched", "batched"))
    table = Table(title="greedy tokens (batch of 3 prompts)")
    table.add_column("prompt")
    for path in results:
        table.add_column(path)
    for index, prompt in enumerate(PROMPTS):
        tokens = [str(result["runs"][1]["results"][index]["tokens"]) for result in results.values()]
        table.add_row(f"{len(prompt)} tokens", *tokens)
    console.print(table)
    speed = Table(title="speed (second generate: nothing new compiled)")
    for column in ("path", "load s", "first generate s", "tokens/s", "graphs", "graph breaks", "recompiles"):
        speed.add_column(column)
    for path, result in results.items():
        first, steady = result["runs"]
        counts = result["dynamo_total"]
        speed.add_row(path, f"{result['load_seconds']:.1f}", f"{first['seconds']:.1f}",
                      f"{steady['tokens'] / steady['seconds']:.2f}", str(counts["unique_graphs"]),
                      str(counts["graph_breaks"]), str(counts["recompiles"]))
    console.print(speed)
    if "nvidia" in results:
        rewrites = Table(title="dsv4_xpu rewrites over the NVIDIA model's graphs")
        for column in ("pass", "graphs", "matched", "changed"):
            rewrites.add_column(column)
        for name, entry in results["nvidia"]["rewrites"].items():
            rewrites.add_row(name, str(entry["graphs"]), str(entry["matched"]), str(entry["changed"]))
        console.print(rewrites)
    if len(results) == 2:
        same = [a["tokens"] == b["tokens"] for a, b in zip(results["nvidia"]["runs"][1]["results"],
                                                           results["cpu-port"]["runs"][1]["results"], strict=True)]
        console.print(f"same tokens as vLLM's CPU port: {same}")
    return 0
