"""The RewriteReport: what the pipeline did to one graph, per pass and per op family."""

from __future__ import annotations

import dataclasses
import io

from rich.console import Console
from rich.table import Table


@dataclasses.dataclass(frozen=True)
class PassStats:
    """What one pass did (nodes matched, nodes changed, milliseconds), and `detail`: the same split by op family
    or construct ('activation', 'mhc', 'stream ops', ...)."""

    name: str
    matched: int
    changed: int
    ms: float
    skipped: bool = False
    detail: tuple[PassStats, ...] = ()
    kernels: tuple[tuple[str, str], ...] = ()  # op -> the implementation its calls got (lower_ops)


@dataclasses.dataclass
class RewriteReport:
    """What the pipeline did to one graph: per pass (and per op family), nodes matched, changed, milliseconds."""

    graph: str
    device: str
    passes: list[PassStats] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    compiled_by: str | None = None  # set by the backend: what ran the rewritten graph, and why if not Inductor

    def __getitem__(self, name: str) -> PassStats:
        """The stats of a pass ('lower_ops') or of a family inside one ('mhc')."""
        for stats in self.passes:
            for row in (stats, *stats.detail):
                if row.name == name:
                    return row
        rows = [row.name for stats in self.passes for row in (stats, *stats.detail)]
        raise KeyError(f"{name!r}: rows are {rows}")

    def get(self, name: str) -> PassStats | None:
        try:
            return self[name]
        except KeyError:
            return None

    @property
    def kernels(self) -> dict[str, str]:
        """Op qualname -> what its calls became: "native" (the lowering's math) or "<provider> (<kernel>)"."""
        return {op: label for stats in self.passes for op, label in stats.kernels}

    @property
    def total_changed(self) -> int:
        return sum(s.changed for s in self.passes)

    @property
    def headline(self) -> str:
        return f"dsv4_xpu rewrite of {self.graph} for {self.device}: {self.nodes_before} -> {self.nodes_after} nodes"

    def table(self, title: bool = True) -> Table:
        """The report as a rich table (family rows indented under their pass)."""
        table = Table(title=self.headline if title else None, title_justify="left")
        for name, justify in (("pass", "left"), ("matched", "right"), ("changed", "right"), ("ms", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for s in self.passes:
            style = "dim" if s.skipped else ("green" if s.changed else "")
            table.add_row(s.name, "skipped" if s.skipped else str(s.matched), "-" if s.skipped else str(s.changed),
                          f"{s.ms:.2f}", style=style)
            for row in s.detail:
                table.add_row(f"  {row.name}", "skipped" if row.skipped else str(row.matched),
                              "-" if row.skipped else str(row.changed), "", style="dim")
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=100, color_system=None, legacy_windows=False).print(self.table(title=False))
        compiled = f"\ncompiled by: {self.compiled_by}" if self.compiled_by else ""
        kernels = "".join(f"\n  {op}: {label}" for op, label in self.kernels.items())
        kernels = f"\nkernels:{kernels}" if kernels else ""
        return f"{self.headline}\n{buffer.getvalue().rstrip()}{kernels}{compiled}"


_reports: list[RewriteReport] = []


def record(report: RewriteReport) -> None:
    """Keep `report` as the latest (the 64 most recent are kept)."""
    _reports.append(report)
    del _reports[:-64]


def last_report() -> RewriteReport | None:
    """The report of the most recent rewrite in this process (None before the first)."""
    return _reports[-1] if _reports else None


def all_reports() -> list[RewriteReport]:
    """The reports of the recent rewrites in this process, oldest first (one per graph, so a model with
    graph breaks leaves several)."""
    return list(_reports)
