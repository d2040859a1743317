"""Caches and recompiles: Inductor's FX-graph cache never serves a graph rewritten with other options or by
another version of a pass, two models compiled in one process do not interfere, and
`torch._dynamo.reset()` between compiles works.

Why it holds: the backend hands Inductor the rewritten graph, and Inductor keys its FX-graph cache on the
ATen graph that AOT autograd traces from it, with the native lowerings inlined. Another option that changes
the rewrite, or another formula behind the same function name, is another ATen graph, so another key.
(The AOT-autograd cache, keyed on the Dynamo-level graph, bypasses graphs that call the lowerings' Python
functions: it cannot hash their bodies.)

Every test uses a fresh TORCHINDUCTOR_CACHE_DIR under tmp_path with `fx_graph_cache=True`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch
from torch._dynamo.utils import counters

import dsv4_compile
import dsv4_compile.frontend.ops.activation as activation
from dsv4_compile.lowering.registry import LOWERINGS
from dsv4_compile.models.deepseek_v4.cuda_ops import cpu_reference_kernels
from dsv4_compile.models.deepseek_v4.oracle import _silu_and_mul_with_clamp as oracle_activation
from tests.blocks import CudaOrientedBlock, native_block
from tests.conftest import needs_trace_time_retarget, reports_since


@pytest.fixture(autouse=True)
def fresh_inductor_cache(tmp_path) -> Iterator[None]:
    from torch._inductor.utils import fresh_cache

    with fresh_cache(dir=str(tmp_path)), torch._inductor.config.patch(fx_graph_cache=True):
        yield


def act(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops._C.silu_and_mul_with_clamp(out, x, 5.0)
    return out * 2


def compile_once(fn: Callable[..., torch.Tensor], *args: torch.Tensor, **options: object
                 ) -> tuple[torch.Tensor, dict[str, int]]:
    """Compile `fn` from scratch (Dynamo reset) through Inductor, run it; its result and the FX-graph cache
    counters of this compile."""
    torch._dynamo.reset()
    counters["inductor"].clear()
    out = dsv4_compile.compile(fn, **options)(*args)
    stats = counters["inductor"]
    return out, {"hit": stats["fxgraph_cache_hit"], "miss": stats["fxgraph_cache_miss"]}


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 4


def test_other_options_never_hit_the_other_graph():
    expected = 2 * oracle_activation(X, 5.0)
    out, stats = compile_once(act, X)
    assert stats == {"hit": 0, "miss": 1}
    torch.testing.assert_close(out, expected)
    out, stats = compile_once(act, X)  # the same rewrite: served from the cache
    assert stats == {"hit": 1, "miss": 0}
    torch.testing.assert_close(out, expected)
    with pytest.warns(UserWarning, match="native lowering that was not applied"), cpu_reference_kernels():
        # the activation family off: the graph keeps the op (run on a test-only CPU kernel): another graph, a miss
        out, stats = compile_once(act, X, disable=["activation"], strict=False)
    assert stats == {"hit": 0, "miss": 1}
    torch.testing.assert_close(out, expected)
    assert dsv4_compile.last_report()["activation"].skipped
    out, stats = compile_once(act, X, strict=False)  # an option that does not change the rewritten graph
    assert stats == {"hit": 1, "miss": 0}
    torch.testing.assert_close(out, expected)


def test_another_pass_version_is_not_served_from_the_cache(monkeypatch):
    """A new version of a native lowering (same module and name, another formula) must miss the cache and
    serve the new numbers; going back to the old version hits the old entry."""
    original = LOWERINGS[activation.QUALNAME]
    old, stats = compile_once(act, X)
    assert stats["miss"] == 1

    def silu_and_mul_with_clamp_native(input: torch.Tensor, limit: float, alpha: float = 1.0,  # noqa: A002
                                       beta: float = 0.0) -> torch.Tensor:
        return original.native(input, limit, alpha, beta + 0.25)  # "v2": another formula

    for attr in ("__module__", "__name__", "__qualname__"):
        setattr(silu_and_mul_with_clamp_native, attr, getattr(original.native, attr))
    v2 = dataclasses.replace(original, native=silu_and_mul_with_clamp_native)
    monkeypatch.setitem(LOWERINGS, activation.QUALNAME, v2)
    new, stats = compile_once(act, X)
    assert stats == {"hit": 0, "miss": 1}
    torch.testing.assert_close(new, 2 * oracle_activation(X, 5.0, beta=0.25))
    assert not torch.allclose(new, old)
    monkeypatch.undo()
    back, stats = compile_once(act, X)
    assert stats == {"hit": 1, "miss": 0}
    torch.testing.assert_close(back, old)


@needs_trace_time_retarget
def test_two_models_in_one_process_do_not_interfere():
    with dsv4_compile.cuda_compat("cpu"):
        a = CudaOrientedBlock(hidden=32, intermediate=64, limit=2.0, seed=1)
        b = CudaOrientedBlock(hidden=32, intermediate=64, limit=9.0, seed=2)  # another constant in the graph
        c = CudaOrientedBlock(hidden=32, intermediate=64, limit=2.0, seed=3)  # a's graph, other weights
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    counters["inductor"].clear()
    graphs = counters["stats"]["unique_graphs"]
    compiled = {name: dsv4_compile.compile(block, fullgraph=True) for name, block in (("a", a), ("b", b), ("c", c))}
    for _ in range(2):  # interleaved calls: each model gets its own numbers
        for name, block in (("a", a), ("b", b), ("c", c)):
            torch.testing.assert_close(compiled[name](x), native_block(block, x), rtol=1e-4, atol=1e-4)
    # a and b: two graphs (b's limit is baked in as a constant, so Dynamo's guard fails and b recompiles);
    # c passes a's guards and reuses a's compiled graph, with its own weights (graph inputs)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert (counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]) == (2, 0)
    reports = dsv4_compile.all_reports()[-2:]
    assert all(r["activation"].changed == 1 and r["audit"].matched == 0 for r in reports)
    # c compiled from scratch: Inductor serves a's entry (same graph), still with c's weights
    out, stats = compile_once(c, x, fullgraph=True)
    assert stats == {"hit": 1, "miss": 0}
    torch.testing.assert_close(out, native_block(c, x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, native_block(a, x), rtol=1e-2, atol=1e-2)


def test_dynamo_reset_between_compiles():
    def other(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        torch.ops._C.silu_and_mul_with_clamp(out, x, 1.5, 1.702, 1.0)
        return out - 1

    seen = dsv4_compile.all_reports()
    for round_ in range(3):
        for fn, expected in ((act, 2 * oracle_activation(X, 5.0)), (other, oracle_activation(X, 1.5, 1.702, 1.0) - 1)):
            out, stats = compile_once(fn, X)
            torch.testing.assert_close(out, expected)
            assert stats == ({"hit": 0, "miss": 1} if round_ == 0 else {"hit": 1, "miss": 0})
    assert len(reports_since(seen)) == 6  # every compile after a reset rewrote its graph anew
