"""`make demo`: compile the tiny CUDA-oriented DeepSeek-V4 model with dsv4_xpu on the local device, check parity."""

from __future__ import annotations

import time

import torch

import dsv4_compile


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
