"""Shared benchmark helpers: timing (medians) as plain calls and as CUDA-graph replays, kernel counts and a
per-kernel profile, device-copy bandwidth, JSON (with the exact command line) + PNG output.

These benchmarks run on an NVIDIA GPU standing in for an Intel XPU: the numbers are NVIDIA numbers of the same
generated code (Inductor's Triton kernels), not XPU measurements."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def bench_us(fn: Callable[[], object], *, warmup: int = 10, reps: int = 100) -> float:
    """Median microseconds of `fn()`: Triton's do_bench on CUDA, wall clock elsewhere."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=warmup, rep=reps, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def graph_us(fn: Callable[[], object], *, warmup: int = 3, reps: int = 100) -> float | None:
    """Median microseconds of replaying `fn` recorded as one CUDA graph (no launch overhead on the CPU); None
    when `fn` cannot be recorded."""
    if not torch.cuda.is_available():
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"  (not recordable as a CUDA graph: {str(exc).splitlines()[0][:120]})")
        return None
    return bench_us(graph.replay, warmup=warmup, reps=reps)


def top_kernels(fn: Callable[[], object], n: int = 10) -> list[dict]:
    """The `n` kernels taking the most GPU time in one call of `fn`: name, calls, us, share of the kernel time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time
    whole = sum(us for _, us in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:n]
    return [{"kernel": name[:90], "calls": calls, "us": us, "share": us / whole} for name, (calls, us) in ranked]


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), reps=50)
    return 2 * nbytes / (us * 1e-6) / 1e9


def kernel_launches(fn: Callable[[], object]) -> int:
    """GPU kernels launched by one call of `fn` (torch.profiler), after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def command_line() -> str:
    """The command this process was started with, as typed (interpreter, flags, module or script, arguments)."""
    return shlex.join(sys.orig_argv)


def environment() -> dict:
    """Where the numbers come from."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if torch.cuda.is_available():
        import triton

        env |= {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                "note": "an NVIDIA GPU standing in for an Intel XPU: not XPU measurements"}
    else:
        env["device"] = "cpu"
    return env


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """benchmarks/results/<name>.json with the exact command line that made it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command_line(), "environment": environment(), "rows": rows,
               **(extra or {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table of `rows` on stdout."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(name: str, rows: list[dict], x: str, ys: list[str], *, ylabel: str, logx: bool = True) -> Path | None:
    """benchmarks/results/<name>.png: one line per `ys` column against `x` (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for y in ys:
        points = [(r[x], r[y]) for r in rows if r.get(y) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=y)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
