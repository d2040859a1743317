"""See every rewrite: per-pass graph snapshots, unified diffs and op-count deltas.

`DiffRecorder` is a pipeline observer (`run_pipeline(..., observer=recorder)`). For each pass that runs it
  - sends the graph code before and after the pass to torch's structured log as artifacts named
    `dsv4_xpu.<i>.<pass>.before` / `.after` (TORCH_TRACE=dir + tlparse shows them), and through
    `torch._dynamo.utils.lazy_format_graph_code` (so `depyf.prepare_debug` dumps them as files);
  - keeps a PassDiff for every pass that changed the graph: code before/after, unified diff, op deltas.
`recorder.write(dump_dir)` writes `index.md` plus, per changed pass, `<NN>.<pass>.before.py`, `.after.py`
and `.diff` in a folder per graph (the backend's `dump_dir` option).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import logging
import os
import re
from pathlib import Path

import torch
import torch.fx

from dsv4_compile.errors import node_target_name
from dsv4_compile.lowering.report import PassStats

log = logging.getLogger("dsv4_compile.tools.diff")

ARTIFACT_PREFIX = "dsv4_xpu"
_CALLS = ("call_function", "call_method", "call_module")


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph's Python code plus its node annotations (stream tags), which the code does not show."""
    lines = [gm.code.strip("\n")]
    tagged = [(n.name, n.meta["custom"]) for n in gm.graph.nodes if n.meta.get("custom")]
    if tagged:
        lines += ["", "# node annotations (meta['custom']):"]
        lines += [f"#   {name}: {custom}" for name, custom in tagged]
    return "\n".join(lines) + "\n"


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter[str]:
    """How many call nodes the graph has per target name ('torch.sigmoid', '.mean()', '_C::op', ...)."""
    return collections.Counter(node_target_name(n) for n in gm.graph.nodes if n.op in _CALLS)


@dataclasses.dataclass(frozen=True)
class OpDelta:
    """One row of an op-count delta table."""

    op: str
    before: int
    after: int

    @property
    def delta(self) -> int:
        return self.after - self.before


@dataclasses.dataclass(frozen=True)
class PassDiff:
    """What one pass did to one graph."""

    index: int
    name: str
    before: str
    after: str
    stats: PassStats
    ops_before: collections.Counter[str]
    ops_after: collections.Counter[str]

    @property
    def stem(self) -> str:
        """File stem of this pass's stage files: '<NN>.<pass>'."""
        return f"{self.index:02d}.{self.name}"

    @property
    def unified(self) -> str:
        """Unified diff of the graph text, before -> after."""
        return "".join(difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
            fromfile=f"{self.stem}.before.py", tofile=f"{self.stem}.after.py",
        ))

    @property
    def op_deltas(self) -> list[OpDelta]:
        """Ops whose count changed, most removed first."""
        ops = set(self.ops_before) | set(self.ops_after)
        rows = [OpDelta(op, self.ops_before[op], self.ops_after[op]) for op in ops]
        return sorted((r for r in rows if r.delta), key=lambda r: (r.delta, r.op))

    def delta_table(self) -> str:
        """The op-count deltas as a Markdown table."""
        if not self.op_deltas:
            return "_no op-count change (only arguments or annotations changed)_"
        lines = ["| op | before | after | delta |", "|---|---:|---:|---:|"]
        lines += [f"| `{r.op}` | {r.before} | {r.after} | {r.delta:+d} |" for r in self.op_deltas]
        return "\n".join(lines)


class DiffRecorder:
    """Pipeline observer: structured-log artifacts for every pass, a PassDiff for every pass that changed."""

    def __init__(self, graph: str = "graph", device: str = "", *, record: bool = True) -> None:
        """`record=False` only emits the log artifacts (what the backend does without `dump_dir`)."""
        self.graph = graph
        self.device = device
        self.record = record
        self.diffs: list[PassDiff] = []
        self.stats: list[tuple[int, PassStats]] = []
        self.nodes: list[int] = []
        self._pending: tuple[str, collections.Counter[str]] | None = None

    def __call__(self, index: int, name: str, gm: torch.fx.GraphModule, stats: PassStats | None) -> None:
        stage = "before" if stats is None else "after"
        emit_artifact(f"{ARTIFACT_PREFIX}.{index}.{name}.{stage}", gm)
        if not self.record:
            return
        code = graph_text(gm)
        if stats is None:
            self._pending = (code, op_counts(gm))
            if not self.nodes:
                self.nodes.append(len(gm.graph.nodes))
            return
        before, ops_before = self._pending or ("", collections.Counter())
        self._pending = None
        self.stats.append((index, stats))
        self.nodes.append(len(gm.graph.nodes))
        if before != code or stats.changed:
            self.diffs.append(PassDiff(index, name, before, code, stats, ops_before, op_counts(gm)))

    def __getitem__(self, name: str) -> PassDiff:
        for diff in self.diffs:
            if diff.name == name:
                return diff
        raise KeyError(f"pass {name!r} changed nothing (or did not run); changed: {[d.name for d in self.diffs]}")

    def markdown(self, folder: str = "", error: str | None = None) -> str:
        """This graph's section of index.md; file links are relative to the dump folder."""
        changed = {d.index: d for d in self.diffs}
        nodes = f"{self.nodes[0]} -> {self.nodes[-1]} nodes" if self.nodes else "no pass ran"
        lines = [f"## {self.graph} -> {self.device or '?'} ({nodes})", "",
                 "| # | pass | matched | changed | ms | stage files |", "|---:|---|---:|---:|---:|---|"]
        for index, stats in self.stats:
            diff = changed.get(index)
            files = "no change"
            if diff is not None:
                files = " ".join(f"[{kind}]({folder}/{diff.stem}.{ext})"
                                 for kind, ext in (("before", "before.py"), ("after", "after.py"), ("diff", "diff")))
            lines.append(f"| {index} | {stats.name} | {stats.matched} | {stats.changed} | {stats.ms:.2f} | {files} |")
        if error:
            lines += ["", "**The pipeline stopped with an error:**", "", "```", error.strip(), "```"]
        for diff in self.diffs:
            lines += ["", f"### {diff.index}. {diff.name}", "", diff.delta_table()]
        return "\n".join(lines) + "\n"

    def write(self, dump_dir: str | os.PathLike[str], error: str | None = None) -> Path:
        """Write this graph's stage files and (re)write `index.md` in `dump_dir`; returns the index path."""
        root = Path(dump_dir)
        sections = _INDEX.setdefault(root.resolve(), {})
        folder = _unique_slug(self.graph, sections)
        (root / folder).mkdir(parents=True, exist_ok=True)
        for diff in self.diffs:
            (root / folder / f"{diff.stem}.before.py").write_text(diff.before)
            (root / folder / f"{diff.stem}.after.py").write_text(diff.after)
            (root / folder / f"{diff.stem}.diff").write_text(diff.unified)
        sections[folder] = self.markdown(folder, error)
        index = root / "index.md"
        header = "# dsv4_xpu rewrites\n\nOne section per rewritten graph; stage files for the passes that changed it.\n"
        index.write_text("\n".join([header, *sections.values()]))
        return index


# dump folder -> {graph folder: index.md section}, for the graphs written by this process.
_INDEX: dict[Path, dict[str, str]] = {}


def _unique_slug(graph: str, taken: dict[str, str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", graph).strip("_") or "graph"
    candidate, n = slug, 1
    while candidate in taken:
        n += 1
        candidate = f"{slug}-{n}"
    return candidate


def emit_artifact(name: str, gm: torch.fx.GraphModule) -> None:
    """Send the graph's current code to torch's structured trace log (formatted only if someone listens)
    and to the graph-code log, which `depyf.prepare_debug` turns into a file."""
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=lambda: graph_text(gm),
    )
    from torch._dynamo.utils import lazy_format_graph_code

    try:
        log.debug("%s", lazy_format_graph_code(name, gm))
    except Exception as exc:  # a debug hook (depyf) must never break the rewrite
        log.debug("graph-code log of %s failed: %s", name, exc)
