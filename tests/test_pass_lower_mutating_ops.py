"""Ops that write arguments in place (`mutates=`): a cache scatter that also returns a tensor, as vLLM's KV
insert ops do. The native function writes the cache itself; the call stays a side effect (nothing reads its
result, yet it must run), and the write reaches the caller's tensor through Inductor."""

from __future__ import annotations

import pytest
import torch

import dsv4_compile
from tests.conftest import lower_graph_testing

# `scatter_rows(x, cache, slots) -> x * 2`: writes `x` into `cache` rows `slots` (-1: skip); CUDA kernel only.
_lib = torch.library.Library("dsv4_mutop", "DEF")
_lib.define("scatter_rows(Tensor x, Tensor(a!) cache, Tensor slots) -> Tensor")


def _cuda_scatter_rows(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    keep = slots >= 0
    cache[slots[keep]] = x[keep]
    return x * 2


_lib.impl("scatter_rows", _cuda_scatter_rows, "CUDA")
torch.library.register_fake("dsv4_mutop::scatter_rows", lambda x, cache, slots: torch.empty_like(x), lib=_lib)


@dsv4_compile.native_lowering("dsv4_mutop::scatter_rows", family="mutop", mutates=("cache",))
def scatter_rows_native(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    keep = slots >= 0
    cache.index_put_((slots[keep].long(),), x[keep])
    return x * 2


def uses_result(x, cache, slots):
    return torch.ops.dsv4_mutop.scatter_rows(x, cache, slots) + 1


def ignores_result(x, cache, slots):
    torch.ops.dsv4_mutop.scatter_rows(x, cache, slots)
    return x.sum()


def inputs():
    x = torch.arange(12.0).view(4, 3)
    return x, torch.zeros(6, 3), torch.tensor([5, -1, 0, 2])


def expected_cache(x, cache, slots):
    cache = cache.clone()
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            cache[slot] = x[row]
    return cache


@pytest.mark.parametrize("fn", [uses_result, ignores_result], ids=["result-used", "result-unused"])
def test_a_mutating_op_writes_the_callers_tensor_through_inductor(fn):
    x, cache, slots = inputs()
    want = expected_cache(x, cache, slots)
    got = torch.compile(fn, backend="dsv4_xpu", fullgraph=True)(x, cache, slots)
    torch.testing.assert_close(cache, want)
    if fn is uses_result:
        torch.testing.assert_close(got, x * 2 + 1)
    report = dsv4_compile.last_report()
    assert report["mutop"].changed == 1 and report["audit"].matched == 0


def test_the_call_survives_as_a_side_effect_even_when_its_result_is_unused():
    lowered = lower_graph_testing(ignores_result, *inputs(), expected_before=["dsv4_mutop::scatter_rows"],
                                  expected_after=["scatter_rows_native"], unexpected_after=["dsv4_mutop::"])
    assert lowered.after["scatter_rows_native"] == 1


def test_out_and_mutates_together_are_refused():
    with pytest.raises(ValueError, match=r"either out= .* or mutates="):
        dsv4_compile.native_lowering("dsv4_mutop::other", out="a", mutates=("b",))(lambda a, b: None)
