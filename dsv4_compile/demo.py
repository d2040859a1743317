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
    """Compile the CUDA-oriented tiny() DeepSeek-V4 model for `device`; print the rewrite reports, the max
    error against the native oracle for prefill and decode, and compile times. 0 if parity holds."""
    from rich.console import Console

    from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill
    from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
    from dsv4_compile.models.deepseek_v4.static_cache import (
        StaticCache,
        decode_inputs,
        mark_tokens_dynamic,
        prefill_inputs,
    )

    console = Console()
    device = device or local_device()
    console.print(f"[bold]dsv4_xpu demo[/bold]: CUDA-oriented DeepSeek-V4 tiny() on [cyan]{device}[/cyan] "
                  f"(torch {torch.__version__})")
    model = DeepseekV4Model(DeepseekV4Config.tiny(), dtype=torch.float32, device=device)
    with dsv4_compile.cuda_compat(device):
        cuda_model = CudaDeepseekV4(model)  # builds torch.cuda.Stream()s and Events
    cache = StaticCache(model, max_seq_len=64, num_slots=2)
    prefill = dsv4_compile.compile(cuda_model.prefill_static, device=device, fullgraph=True)
    decode = dsv4_compile.compile(cuda_model.decode_static, device=device, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    errors, ok = {}, True
    oracle_caches = []
    for slot, n in enumerate((40, 23)):
        tokens = torch.randint(0, 256, (n,), generator=gen).to(device)
        expected, oracle_cache = oracle_prefill(model, tokens)
        oracle_caches.append(oracle_cache)
        start = time.perf_counter()
        got = prefill(*mark_tokens_dynamic(tokens, *prefill_inputs(cache, slot, n)), cache)
        if slot == 0:
            console.print(f"\n[bold]prefill[/bold] (compile + first call {time.perf_counter() - start:.1f} s)")
            console.print(str(dsv4_compile.last_report()))
        errors[f"prefill {n} tokens"] = (got - expected).abs().max().item()
    for step in range(3):
        tokens = torch.randint(0, 256, (2,), generator=gen).to(device)
        expected = oracle_decode(model, tokens, oracle_caches)
        start = time.perf_counter()
        got = decode(*mark_tokens_dynamic(tokens, *decode_inputs(cache, torch.tensor([0, 1]))), cache)
        if step == 0:
            seconds = time.perf_counter() - start
            console.print(f"\n[bold]decode[/bold], batch 2 (compile + first call {seconds:.1f} s)")
            console.print(str(dsv4_compile.last_report()))
        errors[f"decode step {step}"] = (got - expected).abs().max().item()
    console.print("\n[bold]parity against the native oracle[/bold] (fp32 logits, tolerance 2e-4)")
    for name, error in errors.items():
        good = error <= 2e-4
        ok &= good
        verdict = "[green]ok[/green]" if good else "[red]MISMATCH[/red]"
        console.print(f"  {name:<20} max |compiled - oracle| = {error:.2e}  {verdict}")
    return 0 if ok else 1
