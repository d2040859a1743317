"""Sweep of the mHC Triton kernels' launch configurations (lowerings/mhc_triton.py), GPU time per call from the
profiler, at Flash width (hc_mult 4, hidden 4096): where the constants PROJECT_FEW_TOKENS / PROJECT_MANY_TOKENS,
BLOCK_H and GATES_WARPS come from.

    python -m benchmarks.sweep_mhc_kernels      (on a CUDA GPU; writes results/mhc_sweep.txt)

NVIDIA numbers standing in for XPU, not XPU measurements.
"""

from __future__ import annotations

import itertools

import torch

from benchmarks.common import RESULTS, command_line, environment, top_kernels
from dsv4_compile.lowering.lowerings import mhc_triton

M, HIDDEN = 4, 4096


def kernel_us(fn) -> float:
    return sum(k["us"] for k in top_kernels(fn, 100))


def sweep(tokens: int, log) -> None:
    h = torch.randn(tokens, M, HIDDEN, device="cuda").bfloat16()
    fn = torch.randn(M * (M + 2), M * HIDDEN, device="cuda") * 0.01
    scale, base = torch.rand(3, device="cuda"), torch.randn(M * (M + 2), device="cuda")

    def project() -> torch.Tensor:
        return torch.ops.dsv4_triton.mhc_project(h.flatten(1), fn)

    best = None
    for config in itertools.product((32, 64, 128), (512, 1024, 2048), (64, 128), (4, 8)):
        if config[1] < config[2]:
            continue
        mhc_triton.PROJECT_FEW_TOKENS = mhc_triton.PROJECT_MANY_TOKENS = config
        us = kernel_us(project)
        best = min(best or (us, config), (us, config))
        log(f"proj T={tokens} BT={config[0]} KS={config[1]} BK={config[2]} W={config[3]}: {us:.1f}")
    log(f"BEST proj {tokens} {best}")
    mhc_triton.PROJECT_FEW_TOKENS = mhc_triton.PROJECT_MANY_TOKENS = best[1]
    partials = project()
    for block_h, warps, head in itertools.product((512, 1024, 2048), (2, 4, 8), (False, True)):
        mhc_triton.BLOCK_H, mhc_triton.GATES_WARPS = block_h, warps
        us = kernel_us(lambda head=head: torch.ops.dsv4_triton.mhc_gates_collapse(
            partials, M if head else M * (M + 2), M * HIDDEN, scale, base, h, None, None, torch.bfloat16,
            1e-6, 1e-6, 1e-6, 2.0, 20, 1e-6, head, 0, False))
        log(f"gates T={tokens} BH={block_h} W={warps} head={head}: {us:.1f}")


def main() -> None:
    lines = [f"# {command_line()}", f"# {environment()}"]

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for tokens in (1, 4096, 16384):
        sweep(tokens, log)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mhc_sweep.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
