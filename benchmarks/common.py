"""Shared benchmark helpers: timing (medians), kernel counts, device-copy bandwidth, JSON + PNG output."""

from __future__ import annotations

import json
import platform
import statistics
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


def environment() -> dict:
    """Where the numbers come from."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if torch.cuda.is_available():
        import triton

        env |= {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    else:
        env["device"] = "cpu"
    return env


def write_results(name: str, command: str, rows: list[dict], extra: dict | None = None) -> Path:
    """benchmarks/results/<name>.json with the command that made it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, "environment": environment(), "rows": rows, **(extra or {})}
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
