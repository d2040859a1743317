"""The ordered pass list, and the RewriteReport of one run over one graph.

Every pass takes `(GraphModule, PassContext)` and returns a PassResult; after each pass the graph is
linted and recompiled, so a pass that breaks the graph is caught at the pass that broke it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
import torch.fx

from dsv4_compile.passes.audit import audit_residual_cuda
from dsv4_compile.passes.aux_streams import remove_aux_streams
from dsv4_compile.passes.base import PassContext, PassResult
from dsv4_compile.passes.device_constants import retarget_device_constants
from dsv4_compile.passes.mhc import rewrite_mhc
from dsv4_compile.passes.pdl import disable_pdl
from dsv4_compile.passes.silu_and_mul_with_clamp import rewrite_silu_and_mul_with_clamp
from dsv4_compile.passes.tile_scheduler import short_circuit_tile_scheduler

log = logging.getLogger("dsv4_compile")

Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    run: Pass
    summary: str


PASSES: tuple[PassSpec, ...] = (
    PassSpec("silu_and_mul_with_clamp", rewrite_silu_and_mul_with_clamp,
             "_C.silu_and_mul_with_clamp(out, x, limit, ...) -> native clamp + SiLU + mul"),
    PassSpec("mhc", rewrite_mhc,
             "fused mHC ops (mhc_pre, mhc_post, mhc_fused_post_pre, hc_head) -> their torch math"),
    PassSpec("aux_streams", remove_aux_streams,
             "aux-stream fork/join, stream waits and events -> removed (serial on the current stream)"),
    PassSpec("pdl", disable_pdl,
             "user Triton launches: launch_pdl dropped, USE_GDC=False (CPU: the kernel's plain-torch fallback)"),
    PassSpec("tile_scheduler", short_circuit_tile_scheduler,
             "FlashMLA tile-scheduler metadata -> removed; its sparse-decode consumer -> native gather + softmax"),
    PassSpec("device_constants", retarget_device_constants,
             'hard-coded device="cuda" constants, .to("cuda"), .cuda() -> the target device'),
    PassSpec("audit", audit_residual_cuda,
             "residual-CUDA check: raises (strict) or warns on any CUDA-only node left"),
)


def pass_names() -> tuple[str, ...]:
    """The pass names, in pipeline order."""
    return tuple(spec.name for spec in PASSES)


@dataclasses.dataclass(frozen=True)
class PassStats:
    name: str
    matched: int
    changed: int
    ms: float
    skipped: bool = False


@dataclasses.dataclass
class RewriteReport:
    """What the pipeline did to one graph: per pass, nodes matched, nodes changed, milliseconds."""

    graph: str
    device: str
    passes: list[PassStats] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    def __getitem__(self, name: str) -> PassStats:
        for stats in self.passes:
            if stats.name == name:
                return stats
        raise KeyError(name)

    @property
    def total_changed(self) -> int:
        return sum(s.changed for s in self.passes)

    def __str__(self) -> str:
        header = f"dsv4_xpu rewrite of {self.graph} for {self.device}: {self.nodes_before} -> {self.nodes_after} nodes"
        rows = [("pass", "matched", "changed", "ms")]
        rows += [(s.name, "skipped" if s.skipped else str(s.matched), "-" if s.skipped else str(s.changed),
                  f"{s.ms:.2f}") for s in self.passes]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [header]
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  " + "  ".join(cells))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


_reports: list[RewriteReport] = []


def last_report() -> RewriteReport | None:
    """The report of the most recent rewrite in this process (None before the first)."""
    return _reports[-1] if _reports else None


def all_reports() -> list[RewriteReport]:
    """The reports of the recent rewrites in this process, oldest first (one per graph, so a model with
    graph breaks leaves several)."""
    return list(_reports)


def run_pipeline(
    gm: torch.fx.GraphModule,
    device: torch.device,
    *,
    strict: bool = True,
    disable: tuple[str, ...] = (),
    name: str | None = None,
    observer: Callable[[int, str, torch.fx.GraphModule, PassStats | None], None] | None = None,
) -> RewriteReport:
    """Run every pass (except those in `disable`) over `gm`, in place, and return the report.

    `observer(index, pass_name, gm, stats)`, if given, is called before each pass that runs (stats None) and
    after it (with its PassStats); `index` is the pass's 1-based position in PASSES. See dsv4_compile.diff.
    """
    ctx = PassContext(device=device, strict=strict)
    report = RewriteReport(graph=name or type(gm).__name__, device=str(device), nodes_before=len(gm.graph.nodes))
    for index, spec in enumerate(PASSES, 1):
        if spec.name in disable:
            report.passes.append(PassStats(spec.name, 0, 0, 0.0, skipped=True))
            continue
        if observer is not None:
            observer(index, spec.name, gm, None)
        start = time.perf_counter()
        result = spec.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        stats = PassStats(spec.name, result.matched, result.changed, 1e3 * (time.perf_counter() - start))
        report.passes.append(stats)
        if observer is not None:
            observer(index, spec.name, gm, stats)
    report.nodes_after = len(gm.graph.nodes)
    _reports.append(report)
    del _reports[:-64]
    log.info("%s", report)
    return report
