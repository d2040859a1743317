"""The ordered pass list, and running it over one graph.

Every pass takes `(GraphModule, PassContext)`, visits the top graph and every higher-order-op subgraph, and
returns a PassResult. Each runs under torch's GraphTransformObserver (Inductor's graph-transform logging,
`disabled_passes` and bisection see it as `dsv4_xpu.<name>`); after it the graph and its subgraphs are linted
and recompiled, so a pass that breaks the graph is caught at the pass that broke it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from dsv4_compile.errors import OptionsError
from dsv4_compile.lowering import lowerings as _lowerings  # noqa: F401 - registers the native lowerings
from dsv4_compile.lowering import providers as _providers  # noqa: F401 - registers the kernel providers
from dsv4_compile.lowering.passes.audit import audit_residual_cuda
from dsv4_compile.lowering.passes.aux_streams import remove_aux_streams
from dsv4_compile.lowering.passes.base import PassContext, PassResult, graph_scopes, tidy
from dsv4_compile.lowering.passes.device_constants import retarget_device_constants
from dsv4_compile.lowering.passes.lower_ops import lower_registered_ops
from dsv4_compile.lowering.passes.pdl import disable_pdl
from dsv4_compile.lowering.registry import families
from dsv4_compile.lowering.report import PassStats, RewriteReport, record

log = logging.getLogger("dsv4_compile")

Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]
Observer = Callable[[int, str, torch.fx.GraphModule, "PassStats | None"], None]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    run: Pass
    summary: str


PASSES: tuple[PassSpec, ...] = (
    PassSpec("aux_streams", remove_aux_streams,
             "aux-stream fork/join, stream waits and events -> removed (serial on the current stream)"),
    PassSpec("lower_ops", lower_registered_ops,
             "every op in the registry -> its native lowering (one row per op family; the tile scheduler "
             "goes with the sparse decode that needed it)"),
    PassSpec("pdl", disable_pdl,
             "user Triton launches: launch_pdl off (a launch option dropped, a constexpr set False), USE_GDC=False "
             "(CPU: the kernel's plain-torch fallback)"),
    PassSpec("device_constants", retarget_device_constants,
             'hard-coded device="cuda" constants, .to("cuda"), .cuda() -> the target device'),
    PassSpec("audit", audit_residual_cuda,
             "residual-CUDA check: raises (strict) or warns on any node with no kernel for the target or "
             "known to be CUDA-only"),
)


def pass_names() -> tuple[str, ...]:
    """The pass names, in pipeline order."""
    return tuple(spec.name for spec in PASSES)


def check_disable(disable: tuple[str, ...]) -> None:
    """`disable` may name passes (not the audit) and op families of `lower_ops`."""
    known = [*pass_names(), *families()]
    unknown = [name for name in disable if name not in known]
    if unknown:
        raise OptionsError(f"cannot disable unknown pass(es) {unknown}; passes are {list(pass_names())}, "
                           f"op families are {list(families())}")
    if "audit" in disable:
        raise OptionsError("the 'audit' pass cannot be disabled; use strict=False to only warn")


def run_pipeline(
    gm: torch.fx.GraphModule,
    device: torch.device,
    *,
    strict: bool = True,
    disable: tuple[str, ...] = (),
    name: str | None = None,
    observer: Observer | None = None,
    providers: tuple[tuple[str, str], ...] = (),
) -> RewriteReport:
    """Run every pass (except those in `disable`) over `gm`, in place, and return the report.

    `observer(index, pass_name, gm, stats)`, if given, is called before each pass that runs (stats None) and
    after it (with its PassStats); `index` is the pass's 1-based position in PASSES. See tools/diff.py.
    """
    check_disable(disable)
    ctx = PassContext(device=device, strict=strict, disabled_families=frozenset(disable) & set(families()),
                      providers=tuple(providers))
    report = RewriteReport(graph=name or type(gm).__name__, device=str(device), nodes_before=_count(gm))
    for index, spec in enumerate(PASSES, 1):
        if spec.name in disable:
            report.passes.append(PassStats(spec.name, 0, 0, 0.0, skipped=True))
            continue
        if observer is not None:
            observer(index, spec.name, gm, None)
        start = time.perf_counter()
        result = GraphTransformObserver(gm, f"dsv4_xpu.{spec.name}", subsystem="dsv4_xpu").apply_gm_pass(
            lambda module, run=spec.run: run(module, ctx))
        tidy(gm)
        if result is None:  # switched off through Inductor's disabled_passes / bisector
            report.passes.append(PassStats(spec.name, 0, 0, 0.0, skipped=True))
            continue
        detail = tuple(PassStats(key, sub.matched, sub.changed, 0.0, skipped=sub.skipped)
                       for key, sub in result.detail.items())
        stats = PassStats(spec.name, result.matched, result.changed, 1e3 * (time.perf_counter() - start),
                          detail=detail, kernels=tuple(sorted(result.kernels.items())))
        report.passes.append(stats)
        if observer is not None:
            observer(index, spec.name, gm, stats)
    report.nodes_after = _count(gm)
    record(report)
    log.info("%s", report)
    return report


def _count(gm: torch.fx.GraphModule) -> int:
    return sum(len(scope.gm.graph.nodes) for scope in graph_scopes(gm))
