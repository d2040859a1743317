"""One tensor-parallel rank running vLLM's NVIDIA DeepSeek-V4 window layer through dsv4_xpu on CPU.

`python -m tests.vllm_real.dsv4_tp_worker RANK WORLD_SIZE PORT WORKDIR` joins a gloo world of WORLD_SIZE ranks
(tcp://127.0.0.1:PORT), builds the one-layer model whose config.json is in WORKDIR/model, loads the full
(unsharded) weights of WORKDIR/weights.pt through vLLM's own weight loaders, which keep this rank's shard, runs
STEPS through a dsv4_xpu-compiled layer and writes WORKDIR/rank{RANK}.pt: the layer's output and, per rewritten
graph, the collective calls before and after the pipeline and the audit's count. The test module runs the same
functions at world size 1 in its own process, as the reference.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dsv4_compile.tools import vllm_layers as harness
from dsv4_compile.tools import vllm_steps as steps

# A prefill, then two single-token decodes.
STEPS = [13, 1, 1]
# Layer 0 of harness.TINY_CONFIG (window only, hash-routed MoE) as a model of its own.
ONE_LAYER = {"num_hidden_layers": 1, "compress_ratios": [0, 0], "num_hash_layers": 1}
COLLECTIVE_MARKERS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "c10d",
                      "shm_", "wait_tensor")
LOWERED_FAMILIES = ("mhc", "kv_cache", "attention", "o_proj")


def make_config(model_folder: str | Path, tensor_parallel_size: int) -> Any:
    """The VllmConfig of the model in `model_folder` at `tensor_parallel_size`. Also imports what vLLM's CPU worker
    imports first (v1/worker/cpu_worker.py:5): the NVIDIA prefill's workspace manager calls
    torch.accelerator.empty_cache, which that import makes a no-op on CPU (workspace.py:261)."""
    import vllm.v1.worker.cpu.shm  # noqa: F401

    from tests.vllm_real.dsv4_dist import parallel_config

    return harness.make_vllm_config(model_folder, parallel_config=parallel_config(tensor_parallel_size))


def load_full_weights(layer: torch.nn.Module, full: dict[str, torch.Tensor], rank: int) -> dict[str, str]:
    """Load unsharded values into `layer` (built at some TP size) as vLLM's loader would: each parameter's own
    weight_loader keeps this rank's slice. Returns, per parameter, how it was loaded."""
    how = {}
    for name, param in layer.named_parameters():
        value = full[name]
        with torch.no_grad():
            if name.endswith("attn_sink"):
                # Padded to the FlashMLA head count and -inf beyond this rank's heads; the model's load_weights
                # slices the checkpoint's sink by this rank's head range (nvidia/model.py:1544-1549).
                local = layer.attn.n_local_heads
                param[:local].copy_(value[rank * local:(rank + 1) * local])
                how[name] = f"heads {rank * local}:{(rank + 1) * local}"
            elif ".experts." in name:
                _load_experts(param, name, value)
                how[name] = "FusedMoE.weight_loader per expert"
            elif param.shape == value.shape and not hasattr(param, "weight_loader"):
                param.copy_(value)
                how[name] = "replicated"
            else:
                param.weight_loader(param, value)
                how[name] = "weight_loader" + ("" if param.shape == value.shape else f" {tuple(value.shape)} -> "
                                                                                  f"{tuple(param.shape)}")
    return how


def _load_experts(param: torch.nn.Parameter, name: str, value: torch.Tensor) -> None:
    """FusedMoE stacks experts as w13 [E, 2I, H] (gate then up) and w2 [E, H, I]; its loader takes one expert's
    checkpoint tensor (w1, w3 or w2) at a time and keeps this rank's rows/columns."""
    for expert, stacked in enumerate(value):
        if "w13" in name:
            gate, up = stacked.chunk(2, dim=0)
            param.weight_loader(param, gate, name, "w1", expert)
            param.weight_loader(param, up, name, "w3", expert)
        else:
            param.weight_loader(param, stacked, name, "w2", expert)


def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (sum(STEPS),), generator=torch.Generator().manual_seed(7))


def _collective_calls(gm: torch.fx.GraphModule) -> list[str]:
    from dsv4_compile.errors import node_target_name
    from dsv4_compile.lowering.passes.base import graph_scopes

    calls = []
    for scope in graph_scopes(gm):
        for node in scope.gm.graph.nodes:
            name = node_target_name(node) if node.op in ("call_function", "call_method") else ""
            if any(marker in name for marker in COLLECTIVE_MARKERS):
                calls.append(f"{name}{tuple(a.name if isinstance(a, torch.fx.Node) else a for a in node.args)}")
    return calls


@contextmanager
def recording_rewrites(records: list[dict[str, Any]]) -> Iterator[None]:
    """While active, every graph dsv4_xpu rewrites adds a record: its collective calls before and after the
    pipeline, the audit's match count and the changes per lowered family."""
    from dsv4_compile.lowering import backend

    original = backend.run_pipeline

    def run_and_record(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        before = _collective_calls(gm)
        report = original(gm, *args, **kwargs)
        records.append({"before": before, "after": _collective_calls(gm), "audit": report["audit"].matched,
                        "lowered": {f: (report.get(f).changed if report.get(f) else 0) for f in LOWERED_FAMILIES}})
        return report

    backend.run_pipeline = run_and_record
    try:
        yield
    finally:
        backend.run_pipeline = original


def run_window_layer(vllm_config: Any, layers: list[torch.nn.Module]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Layer 0 over STEPS (fresh caches, one request), compiled by dsv4_xpu under cuda_compat("cpu"); returns the
    stacked outputs [tokens, hc_mult, hidden] and the rewrite records."""
    import dsv4_compile

    config = vllm_config.model_config.hf_config
    setup = steps.allocate_kv_caches(vllm_config, max_tokens=64, num_sequences=1)
    sequence = steps.new_sequence(setup, 0)
    tokens = token_ids()
    stream = harness.residual_stream(tokens, config.hidden_size, config.hc_mult)
    records: list[dict[str, Any]] = []
    compiled = torch.compile(lambda x, p, i: harness.run_layers(layers[:1], x, p, i), backend="dsv4_xpu")
    outputs, start = [], 0
    with recording_rewrites(records):
        for size in STEPS:
            rows = slice(start, start + size)
            with dsv4_compile.cuda_compat("cpu"), steps.forward_step(vllm_config, setup, sequence, size) as positions:
                outputs.append(compiled(stream[rows], positions, tokens[rows]))
            start += size
    return torch.cat(outputs), records


def main(rank: int, world_size: int, port: int, workdir: Path) -> None:
    torch.set_num_threads(1)
    from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels
    from tests.vllm_real.dsv4_dist import init_distributed

    vllm_config = make_config(workdir / "model", world_size)
    init_distributed(vllm_config, world_size, rank, f"tcp://127.0.0.1:{port}")
    register_metadata_kernels()
    layers = harness.build_nvidia_layers(vllm_config)
    how = load_full_weights(layers[0], torch.load(workdir / "weights.pt"), rank)
    harness.process_weights(vllm_config, layers)
    output, records = run_window_layer(vllm_config, layers)
    torch.save({"output": output, "records": records, "loaded": how}, workdir / f"rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
