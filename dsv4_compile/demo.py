"""`make demo`: compile a small CUDA-oriented block with dsv4_xpu on the local device, check parity."""

from __future__ import annotations

import time

import torch

import dsv4_compile


class CudaOrientedBlock(torch.nn.Module):
    """A clamped-SwiGLU MLP written the CUDA way: aux-stream fork/join, a fused out-parameter op and a
    hard-coded `device="cuda"` constant. Build it under `cuda_compat` where there is no CUDA."""

    def __init__(self, hidden: int = 256, intermediate: int = 512, limit: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.limit = limit
        self.w13 = torch.nn.Parameter(torch.randn(2 * intermediate, hidden, generator=gen) * hidden**-0.5 * 4)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, intermediate, generator=gen) * intermediate**-0.5)
        self.gate = torch.nn.Parameter(torch.randn(hidden, generator=gen))
        self.aux_stream = torch.cuda.Stream()
        self.fork, self.join = torch.cuda.Event(), torch.cuda.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fork.record()
        h = x @ self.w13.T
        with torch.cuda.stream(self.aux_stream):
            self.fork.wait()
            bias = torch.sigmoid(x * self.gate).mean(-1, keepdim=True)
            self.join.record()
        self.join.wait()
        act = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype, device=h.device)
        torch.ops._C.silu_and_mul_with_clamp(act, h, self.limit)
        ramp = torch.arange(x.shape[-1], device="cuda", dtype=x.dtype) / x.shape[-1]
        return act @ self.w2.T + bias * ramp


def native_block(block: CudaOrientedBlock, x: torch.Tensor) -> torch.Tensor:
    """The same block in plain torch: what the upstream XPU fallback runs eagerly."""
    h = x @ block.w13.T
    d = h.shape[-1] // 2
    act = torch.nn.functional.silu(h[..., :d].clamp(max=block.limit)) * h[..., d:].clamp(-block.limit, block.limit)
    ramp = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) / x.shape[-1]
    return act @ block.w2.T + torch.sigmoid(x * block.gate).mean(-1, keepdim=True) * ramp


def local_device() -> str:
    """cuda or xpu when present, else cpu."""
    for kind in ("xpu", "cuda"):
        if getattr(torch, kind).is_available():
            return kind
    return "cpu"


def run_demo(device: str | None = None) -> int:
    """Compile the block, print the rewrite report and the parity check; 0 if parity holds."""
    from rich.console import Console

    console = Console()
    device = device or local_device()
    with dsv4_compile.cuda_compat(device), torch.no_grad():
        block = CudaOrientedBlock().to(device)
        x = torch.randn(64, 256, device=device)
        expected = native_block(block, x)
    compiled = dsv4_compile.compile(block, device=device)
    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(x)
    seconds = time.perf_counter() - start
    console.print(f"[bold]dsv4_xpu demo[/bold] on [cyan]{device}[/cyan] (torch {torch.__version__})")
    console.print(str(dsv4_compile.last_report()))
    error = (got - expected).abs().max().item()
    ok = error <= 1e-3 * max(1.0, expected.abs().max().item())
    console.print(f"compile + first call: {seconds:.1f} s")
    verdict = "[green]parity OK[/green]" if ok else "[red]MISMATCH[/red]"
    console.print(f"max |compiled - eager native| = {error:.3e}  {verdict}")
    return 0 if ok else 1
