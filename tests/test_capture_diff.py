"""capture() keeps CUDA semantics on a CPU-only machine; rewrite() removes them and reports it; every pass
that changed the graph has a diff, an op-count delta, dump files and structured-log artifacts."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import dsv4_compile
from dsv4_compile import DiffRecorder, capture, rewrite
from dsv4_compile.lowering.backend import dsv4_xpu
from dsv4_compile.lowering.passes.audit import find_cuda_only_nodes
from dsv4_compile.lowering.passes.aux_streams import is_stream_node, stream_tag
from dsv4_compile.lowering.passes.device_constants import cuda_device_uses
from dsv4_compile.models.deepseek_v4.oracle import _silu_and_mul_with_clamp as oracle_activation
from tests.blocks import CudaOrientedBlock
from tests.conftest import capture_graph, targets

CHANGING_PASSES = ["aux_streams", "lower_ops", "device_constants"]


def _block() -> CudaOrientedBlock:
    with dsv4_compile.cuda_compat("cuda" if torch.cuda.is_available() else "cpu"):  # real streams on CUDA
        return CudaOrientedBlock(hidden=32, intermediate=64, seed=0)


def _stream_work(gm: torch.fx.GraphModule) -> int:
    return sum(is_stream_node(n) or stream_tag(n) is not None for n in gm.graph.nodes)


def _cuda_constants(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and cuda_device_uses(n)]


@pytest.fixture
def captured() -> tuple[CudaOrientedBlock, torch.fx.GraphModule]:
    block = _block()
    return block, capture(block, torch.randn(5, 32))


def test_capture_keeps_cuda_devices_custom_ops_and_streams(captured):
    block, gm = captured
    placeholders = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders and all(v.device == torch.device("cuda", 0) for v in placeholders)
    assert "_C::silu_and_mul_with_clamp" in targets(gm)
    assert _stream_work(gm) > 0
    assert len(_cuda_constants(gm)) == 2  # torch.empty(device=h.device), torch.arange(device="cuda")
    # the model itself is untouched: real CPU parameters, cuda_compat's stand-ins gone again
    assert all(p.device.type == "cpu" and p.requires_grad for p in block.parameters())
    assert torch.cuda.Stream is not dsv4_compile.frontend.cuda_compat.CompatStream
    assert "__getitem__" not in torch._subclasses.fake_tensor.FakeTensor.__dict__


def test_capture_indexes_fake_cuda_tensors():
    def fn(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        y = x[..., :d] * x[:, d:] + x[0, :d] + x[None, :, 0:1].squeeze(0)
        z = torch.zeros(4, 8, device="cuda")
        z[1:3] = x[idx]
        keep = ~(y > 0)
        return y.t().contiguous(), z, y.masked_fill(keep, 0.0), x.to("cuda") * 2

    gm = capture(fn, torch.randn(4, 8), torch.tensor([0, 2]))
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    outputs = [n.meta["example_value"] for n in output.args[0]]
    assert [o.device.type for o in outputs] == ["cuda"] * 4
    assert [tuple(o.shape) for o in outputs] == [(4, 4), (4, 8), (4, 4), (4, 8)]
    assert any("getitem" in t for t in targets(gm)) and any("setitem" in t for t in targets(gm))


def test_rewrite_copies_removes_cuda_constructs_and_counts_them(captured):
    _, gm = captured
    code, streams = gm.code, _stream_work(gm)
    new, report = rewrite(gm, device="xpu")
    assert new is not gm and gm.code == code and _stream_work(gm) == streams  # the capture is untouched
    assert find_cuda_only_nodes(new, torch.device("xpu")) == []
    assert _stream_work(new) == 0 and _cuda_constants(new) == []
    assert "_C::silu_and_mul_with_clamp" not in targets(new)
    assert report["activation"].changed == 1
    assert report["aux_streams"].matched == streams == report["aux_streams"].changed
    assert report["device_constants"].changed == 1
    assert report["audit"].matched == 0
    assert report.nodes_after < report.nodes_before


def test_per_pass_diffs(captured, tmp_path):
    _, gm = captured
    recorder = DiffRecorder("demo block")
    rewrite(gm, device="xpu", observer=recorder, dump_dir=tmp_path)
    assert [d.name for d in recorder.diffs] == CHANGING_PASSES
    stage_files = sorted(p.name for p in (tmp_path / "demo_block").iterdir())
    assert stage_files == sorted(f"{d.stem}.{ext}" for d in recorder.diffs for ext in ("before.py", "after.py", "diff"))
    assert "## demo block -> xpu" in (tmp_path / "index.md").read_text()
    assert recorder.diffs[0].before.startswith(gm.code.strip("\n"))  # the first 'before' is the capture
    silu = recorder["lower_ops"]
    removed = [ln for ln in silu.unified.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln for ln in silu.unified.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert any("_C.silu_and_mul_with_clamp(" in ln for ln in removed)
    assert any("silu_and_mul_with_clamp_native(" in ln for ln in added)
    assert {r.op: r.delta for r in silu.op_deltas} == {
        "_C::silu_and_mul_with_clamp": -1, "torch.empty": -1, "silu_and_mul_with_clamp_native": 1}
    assert "| `_C::silu_and_mul_with_clamp` | 1 | 0 | -1 |" in silu.delta_table()
    streams = recorder["aux_streams"]
    assert streams.op_deltas and all(r.delta < 0 for r in streams.op_deltas)
    if any(stream_tag(n) is not None for n in gm.graph.nodes):  # torch >= 2.12 tags nodes with their stream
        assert "meta['custom']" in streams.before and "meta['custom']" not in streams.after
    device = recorder["device_constants"]
    assert device.op_deltas == []
    assert re.search(r"^-.*arange.*'cuda'", device.unified, re.M)
    assert re.search(r"^\+.*arange.*xpu", device.unified, re.M)
    for earlier, later in zip(recorder.diffs, recorder.diffs[1:]):
        assert earlier.after == later.before  # nothing happens between the passes that changed the graph
    with pytest.raises(KeyError, match="changed nothing"):
        recorder["pdl"]


def _silu_fn(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2)
    torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
    return out * 2


def test_dump_dir_writes_index_and_stage_files(tmp_path):
    x = torch.randn(4, 8)
    compiled = torch.compile(_silu_fn, backend=dsv4_xpu, options={"dump_dir": tmp_path, "inductor": False})
    torch.testing.assert_close(compiled(x), 2 * oracle_activation(x, 5.0))
    index = (tmp_path / "index.md").read_text()
    assert "| 2 | lower_ops | 1 | 1 |" in index and "no change" in index
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = sorted(p.name for p in folder.iterdir())
    stem = "02.lower_ops"
    assert names == [f"{stem}.after.py", f"{stem}.before.py", f"{stem}.diff"]
    assert f"({folder.name}/{stem}.diff)" in index
    assert "_C.silu_and_mul_with_clamp(" in (folder / f"{stem}.before.py").read_text()
    assert (folder / f"{stem}.diff").read_text().startswith(f"--- {stem}.before.py")


def test_dump_dir_records_a_failed_audit(tmp_path):
    gm, inputs = capture_graph(_silu_fn, torch.randn(4, 8))
    options = {"dump_dir": str(tmp_path), "disable": ["activation"], "inductor": False}
    with pytest.raises(dsv4_compile.CudaOnlyNodesError):
        dsv4_xpu(gm, inputs, options)
    assert "stopped with an error" in (tmp_path / "index.md").read_text()


@pytest.fixture
def trace_records():
    """Records of torch's structured trace log (what TORCH_TRACE writes and tlparse reads)."""
    from torch._logging._internal import trace_log

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, level = Keep(logging.DEBUG), trace_log.level
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)
    yield records
    trace_log.removeHandler(handler)
    trace_log.setLevel(level)


def _artifacts(records: list[logging.LogRecord]) -> dict[str, str]:
    return {r.metadata["artifact"]["name"]: r.payload for r in records
            if isinstance(getattr(r, "metadata", None), dict) and "artifact" in r.metadata}


def test_structured_log_artifacts_for_every_pass(trace_records):
    gm, inputs = capture_graph(_silu_fn, torch.randn(4, 8))
    dsv4_xpu(gm, inputs, {"inductor": False})
    artifacts = {k: v for k, v in _artifacts(trace_records).items() if k.startswith("dsv4_xpu.")}
    names = dsv4_compile.lowering.pipeline.pass_names()
    assert set(artifacts) == {f"dsv4_xpu.{i}.{n}.{s}" for i, n in enumerate(names, 1) for s in ("before", "after")}
    assert "_C.silu_and_mul_with_clamp(" in artifacts["dsv4_xpu.2.lower_ops.before"]
    assert "silu_and_mul_with_clamp_native(" in artifacts["dsv4_xpu.2.lower_ops.after"]


@pytest.mark.filterwarnings("ignore:.*You are trying to debug:UserWarning")
def test_depyf_dumps_every_stage(tmp_path):
    depyf = pytest.importorskip("depyf")
    with depyf.prepare_debug(str(tmp_path)):
        torch.compile(_silu_fn, backend=dsv4_xpu, options={"inductor": False})(torch.randn(4, 8))
    files = [p.name for p in tmp_path.iterdir()]
    for stage in ("dsv4_xpu.2.lower_ops.before", "dsv4_xpu.2.lower_ops.after"):
        assert any(stage in f for f in files), files
