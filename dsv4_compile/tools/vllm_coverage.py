"""`dsv4-compile coverage`: what the installed vLLM's NVIDIA DeepSeek-V4 layers call that is not plain torch, and
how dsv4_compile handles each construct on cpu, xpu and cuda (dsv4_compile.vllm_constructs).

Each layer kind of the tiny config (window attention with hash-routed MoE, compress ratio 4 with the indexer,
ratio 128, and a window layer with bias-routed MoE) is built by vLLM as its worker builds it
(dsv4_compile.tools.vllm_layers), then a prefill of 130 tokens (past the window and the first ratio-128 entry)
and a decode step run through Dynamo under `cuda_compat("cpu")`. A recording backend lists every call of an
op outside aten/prims in each graph, with the vLLM line that made it, then hands the graph to dsv4_xpu without
Inductor (strict audit). An op with no row in the table, or a layer the backend refuses (an op whose schema
is not the one its lowering was written for, a CUDA-only call left), is a finding: the command exits 1.

This runs the layers on CPU with random weights (seconds each); it needs a vLLM whose CPU build loads.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4_compile.vllm_constructs import TARGETS, Construct, find

# layer kind -> (config overrides for write_tiny_config, the layer index of that kind)
LAYER_KINDS: dict[str, tuple[dict[str, Any], int]] = {
    "window-hash": ({}, 0),
    "ratio4": ({}, 1),
    "ratio128": ({}, 2),
    "window-bias": ({"num_hidden_layers": 1, "compress_ratios": [0, 0], "num_hash_layers": 0}, 0),
}
PREFILL_TOKENS = 130
_INDUCTOR_NAMESPACES = ("aten", "prims")
_VLLM_FRAME = re.compile(r'File "[^"]*?/(vllm/[^"]+)", line (\d+)')


@dataclass
class Met:
    """One construct met: its name, the row that handles it (None: unknown), and where vLLM calls it."""

    name: str
    construct: Construct | None
    where: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)


@dataclass
class Coverage:
    met: dict[str, Met] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # "kind/mode" -> the backend's error
    swapped: set[str] = field(default_factory=set)  # entry points of the table bound in vLLM's loaded modules

    @property
    def unknown(self) -> list[Met]:
        return [m for m in self.met.values() if m.construct is None]

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.failures


def vllm_line(node: torch.fx.Node) -> str:
    """The innermost vLLM frame of the node's user stack ("vllm/models/...py:804"), or "?"."""
    frames = _VLLM_FRAME.findall(node.meta.get("stack_trace") or "")
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"


class RecordingBackend:
    """Records the non-aten ops of each graph (and its subgraphs), then compiles it with dsv4_xpu (no Inductor)."""

    def __init__(self, coverage: Coverage, kind: str) -> None:
        self.coverage, self.kind = coverage, kind

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        from dsv4_compile.lowering.backend import dsv4_xpu
        from dsv4_compile.lowering.passes.audit import overloads_of
        from dsv4_compile.lowering.passes.base import graph_scopes

        for scope in graph_scopes(gm):
            for node in scope.gm.graph.nodes:
                overloads = overloads_of(node.target) if node.op == "call_function" else []
                if not overloads:
                    continue
                qualname = overloads[0]._schema.name
                if qualname.split("::", 1)[0] in _INDUCTOR_NAMESPACES:
                    continue
                met = self.coverage.met.setdefault(qualname, Met(qualname, find(qualname)))
                met.where.add(vllm_line(node))
                met.kinds.add(self.kind)
        return dsv4_xpu(gm, example_inputs, options={"inductor": False, "strict": True})


def scan_layer_kind(kind: str, coverage: Coverage) -> None:
    """Build `kind`'s layer, run a prefill and a decode step through the recording backend."""
    import dsv4_compile
    from dsv4_compile.integrations.vllm_engine import mark_kv_caches_static
    from dsv4_compile.tools import vllm_layers, vllm_steps
    from dsv4_compile.tools.vllm_checkpoint import TINY_CONFIG

    overrides, index = LAYER_KINDS[kind]
    vllm_config, layers, _ = vllm_layers.tiny_stack(vllm_layers.build_nvidia_layers, **overrides)
    setup = vllm_steps.allocate_kv_caches(vllm_config, max_tokens=256, num_sequences=1)
    mark_kv_caches_static(torch.nn.ModuleList(layers))
    torch._dynamo.reset()
    run = torch.compile(lambda x, p, i: vllm_layers.run_layers([layers[index]], x, p, i),
                        backend=RecordingBackend(coverage, kind))
    sequence = vllm_steps.new_sequence(setup, 0)
    hidden, hc_mult = int(TINY_CONFIG["hidden_size"]), int(TINY_CONFIG["hc_mult"])
    for mode, count in (("prefill", PREFILL_TOKENS), ("decode", 1)):
        token_ids = torch.arange(sequence.num_computed, sequence.num_computed + count) % 256
        stream = vllm_layers.residual_stream(token_ids, hidden, hc_mult)
        try:
            with dsv4_compile.cuda_compat("cpu"), vllm_steps.batch_step(vllm_config, setup, [(sequence, count)]) as p:
                run(stream, p, token_ids)
        except Exception as exc:
            coverage.failures[f"{kind}/{mode}"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
            return


def scan(kinds: Sequence[str] = tuple(LAYER_KINDS)) -> Coverage:
    """Coverage of the installed vLLM's NVIDIA DeepSeek-V4 layers of `kinds`."""
    import sys

    from dsv4_compile.frontend.kernel_wrappers import vllm_substitutes

    unknown = sorted(set(kinds) - set(LAYER_KINDS))
    if unknown:
        raise ValueError(f"unknown layer kind(s) {unknown}; one of {sorted(LAYER_KINDS)}")
    coverage = Coverage()
    for kind in kinds:
        scan_layer_kind(kind, coverage)
    for dotted in vllm_substitutes(torch.device("cpu")):
        module, _, name = dotted.rpartition(".")
        if hasattr(sys.modules.get(module), name):
            coverage.swapped.add(dotted)
    return coverage


def report_lines(coverage: Coverage) -> list[str]:
    """A plain-text report: each op met with its handling per target, then the entry points swapped, then
    the findings."""
    import vllm

    lines = [f"vLLM {vllm.__version__}: ops met in the NVIDIA DeepSeek-V4 layers ({', '.join(TARGETS)})"]
    for met in sorted(coverage.met.values(), key=lambda m: m.name):
        handling = " / ".join(met.construct.handling(t).value for t in TARGETS) if met.construct else "UNKNOWN"
        lines.append(f"  {met.name}: {handling}  [{', '.join(sorted(met.kinds))}] at {', '.join(sorted(met.where))}")
    lines.append("entry points swapped while tracing (cpu): " + (", ".join(sorted(coverage.swapped)) or "none"))
    for met in coverage.unknown:
        lines.append(f"UNKNOWN {met.name}: no row in dsv4_compile/vllm_constructs.py; called at "
                     f"{', '.join(sorted(met.where))}")
    for where, error in coverage.failures.items():
        lines.append(f"FAILED {where}: {error}")
    lines.append("coverage: ok" if coverage.ok else
                 f"coverage: {len(coverage.unknown)} unknown, {len(coverage.failures)} refused")
    return lines
