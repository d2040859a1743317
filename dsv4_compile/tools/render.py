"""Rich renderables for the `dsv4-compile` command: rewrite reports, per-pass diffs, codegen results."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from dsv4_compile.lowering.passes.narrow_matmuls import SUMMARY as NARROW_MATMULS_SUMMARY
from dsv4_compile.lowering.pipeline import PassSpec
from dsv4_compile.lowering.registry import families
from dsv4_compile.lowering.report import RewriteReport
from dsv4_compile.tools.codegen import CodegenResult
from dsv4_compile.tools.diff import PassDiff
from dsv4_compile.tools.xpu_compile import XpuCompileReport


def passes_table(passes: tuple[PassSpec, ...]) -> Table:
    """The pipeline's passes, in order; under `lower_ops`, the registered ops by family."""
    table = Table(title="dsv4_xpu rewrite passes, in pipeline order")
    table.add_column("#", justify="right")
    table.add_column("pass", style="cyan")
    table.add_column("rewrites")
    for i, spec in enumerate(passes, 1):
        table.add_row(str(i), spec.name, spec.summary)
        if spec.name == "lower_ops":
            for family, ops in families().items():
                table.add_row("", f"  {family}", ", ".join(ops), style="dim")
    table.add_section()
    table.add_row(str(len(passes) + 1), "narrow_matmuls", NARROW_MATMULS_SUMMARY)
    return table


def report_table(report: RewriteReport) -> Table:
    """Per pass (and per op family): nodes matched, nodes changed, milliseconds."""
    return report.table()


def op_delta_table(diff: PassDiff) -> RenderableType:
    """Ops whose count the pass changed."""
    if not diff.op_deltas:
        return Text("no op-count change (only arguments or annotations changed)", style="dim")
    table = Table(title="op-count delta")
    for name, justify in (("op", "left"), ("before", "right"), ("after", "right"), ("delta", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in diff.op_deltas:
        table.add_row(row.op, str(row.before), str(row.after), f"{row.delta:+d}",
                      style="red" if row.delta < 0 else "green")
    return table


def pass_diff(diff: PassDiff) -> Group:
    """Header, op-count deltas and the unified diff of one pass."""
    title = f"{diff.index}. {diff.name}: matched {diff.stats.matched}, changed {diff.stats.changed}"
    return Group(Rule(title, style="cyan"), op_delta_table(diff),
                 Syntax(diff.unified or "(code unchanged)\n", "diff", theme="ansi_dark", word_wrap=True))


def codegen_summary(result: CodegenResult) -> Table:
    """Kernel names and sizes of a codegen result."""
    table = Table(title=f"Inductor code for {result.device}: {result.kernel_count} Triton kernel(s), "
                        f"{len(result.wrapper.splitlines())} wrapper lines")
    table.add_column("kernel", style="cyan")
    table.add_column("lines", justify="right")
    for name, source in result.kernels.items():
        table.add_row(name, str(len(source.splitlines())))
    return table


def xpu_compile_table(report: XpuCompileReport) -> Table:
    """Per kernel: Inductor's or user-defined, configs compiled, the stage all reached, seconds, the error."""
    tool = report.toolchain
    failed = len(report.failures)
    table = Table(title=f"Intel Triton {tool.get('triton', '?')} (torch {tool.get('torch', '?')}), no GPU: "
                        f"{len(report.results)} XPU kernel(s), {report.config_count} config(s), "
                        f"{failed} failed, {report.seconds:.1f} s")
    for name, justify in (("kernel", "left"), ("kind", "left"), ("configs", "right"), ("stage reached", "left"),
                          ("s", "right"), ("error", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in sorted(report.results, key=lambda r: (r.ok, r.kernel)):
        table.add_row(r.kernel, "user" if r.custom else "inductor", f"{r.compiled}/{r.configs}", r.stage,
                      f"{r.seconds:.2f}", "" if r.ok else f"in {r.failed_in}: {(r.error or '').splitlines()[0][:80]}",
                      style=None if r.ok else "red")
    return table
