"""Graph inputs viewing one storage in different dtypes (vLLM's KV-cache buffer layout), compiled with Inductor.

The oracle is eager PyTorch on a fresh copy of the same buffer: the returned values and every byte of the
buffer afterwards must be equal."""

from __future__ import annotations

import pytest
import torch

from dsv4_compile.lowering.aliased_inputs import (
    AliasMismatchError,
    find_mixed_dtype_aliases,
    merge_mixed_dtype_aliases,
)

BLOCKS, PAGE = 6, 160  # bytes per block; both caches start at byte 0 of a block, like vLLM's cache groups


def paged_caches(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 state cache [blocks, 4, 8] and a uint8 cache [blocks, 2, 48] over the same bytes of each block."""
    states = buffer.view(torch.float32).as_strided((BLOCKS, 4, 8), (PAGE // 4, 8, 1))
    rows = buffer.as_strided((BLOCKS, 2, 48), (PAGE, 48, 1))
    return states, rows


def write_both(states: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    states.flatten(0, 1).index_copy_(0, slots, values)
    before = rows[slots // 4].float().sum()  # reads bytes the fp32 write just changed
    rows[slots // 4 + 1, 0, :4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    return before + states.sum()


def _buffer() -> torch.Tensor:
    return torch.randint(0, 64, (BLOCKS * PAGE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _args() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([1, 9]), torch.randn(2, 8, generator=torch.Generator().manual_seed(1))


def test_stock_inductor_rejects_the_layout():
    buffer = _buffer()
    with pytest.raises(Exception, match="views with different dtypes"):
        torch.compile(write_both, backend="inductor")(*paged_caches(buffer), *_args())


STORAGE_MODES = pytest.mark.parametrize("mode", ["inductor", "eager"])


def _compiled_by(mode: str) -> None:
    from dsv4_compile import last_report

    compiled_by = last_report().compiled_by
    if mode == "inductor":
        assert compiled_by == "inductor"
    else:
        assert compiled_by.startswith("eager (inputs") and "view one storage in several dtypes" in compiled_by


@STORAGE_MODES
def test_dsv4_xpu_writes_the_callers_buffer_as_eager_does(mode):
    torch._dynamo.reset()
    expected_buffer = _buffer()
    expected = write_both(*paged_caches(expected_buffer), *_args())
    buffer = _buffer()
    compiled = torch.compile(write_both, backend="dsv4_xpu", options={"mixed_dtype_storage": mode})
    actual = compiled(*paged_caches(buffer), *_args())
    _compiled_by(mode)
    assert torch.equal(buffer, expected_buffer)
    assert not torch.equal(buffer, _buffer())  # the writes happened
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # A second call with new values reuses the compiled code and still writes the caller's bytes.
    slots, values = torch.tensor([3, 17]), torch.ones(2, 8)
    expected = write_both(*paged_caches(expected_buffer), slots, values)
    actual = compiled(*paged_caches(buffer), slots, values)
    assert torch.equal(buffer, expected_buffer) and torch.equal(actual, expected)


@STORAGE_MODES
def test_views_overlapping_at_different_offsets_match_eager(mode):
    # Bytes 16..47 seen as int16 overlap the fp32 view of bytes 0..31 (element offsets 8 and 0 look disjoint if
    # compared without the item size).
    def step(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a.add_(x)
        seen = b.float().sum()
        b[:4].copy_(torch.arange(4, dtype=torch.int16))
        return seen + a.sum()

    def views(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return buffer[:32].view(torch.float32), buffer[16:48].view(torch.int16)

    expected_buffer, buffer = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    expected = step(*views(expected_buffer), torch.ones(8))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="dsv4_xpu", options={"mixed_dtype_storage": mode})
    actual = compiled(*views(buffer), torch.ones(8))
    _compiled_by(mode)
    assert torch.equal(actual, expected) and torch.equal(buffer, expected_buffer)


def test_unknown_mixed_dtype_storage_mode_is_refused():
    from dsv4_compile.errors import OptionsError
    from dsv4_compile.lowering.options import BackendOptions

    with pytest.raises(OptionsError, match=r"mixed_dtype_storage.*'eager', 'inductor'.*'split'"):
        BackendOptions(mixed_dtype_storage="split")


def _graph_and_inputs(fn, *args):
    captured = {}

    def capture(gm, example_inputs):
        captured["graph"], captured["inputs"] = gm, list(example_inputs)
        return gm

    torch.compile(fn, backend=capture)(*args)
    return captured["graph"], captured["inputs"]


def test_only_mixed_dtype_groups_are_merged():
    buffer = _buffer()
    states, rows = paged_caches(buffer)
    gm, inputs = _graph_and_inputs(write_both, states, rows, *_args())
    groups = find_mixed_dtype_aliases(gm, inputs)
    assert len(groups) == 1 and {m.dtype for m in groups[0].members} == {torch.float32, torch.uint8}
    assert groups[0].nbytes == BLOCKS * PAGE
    same_dtype = buffer.as_strided((BLOCKS, 2, 48), (PAGE, 48, 1))
    gm, inputs = _graph_and_inputs(lambda a, b: a.add_(1) + b, same_dtype, rows)
    assert find_mixed_dtype_aliases(gm, inputs) == []


def _merged_eager(fn, *args):
    """`fn`'s graph with its aliased inputs merged, run eagerly; called with `fn`'s arguments (in any layout)."""
    gm, inputs = _graph_and_inputs(fn, *args)
    positions = [next(i for i, arg in enumerate(args) if arg is value) for value in inputs]  # graph input order
    merged = merge_mixed_dtype_aliases(gm, inputs, lambda graph, example: graph)
    assert merged is not None
    return lambda *call_args: merged(*(call_args[i] for i in positions))


def test_rewritten_graph_run_eagerly_matches_and_checks_aliasing_at_call_time():
    merged = _merged_eager(write_both, *paged_caches(_buffer()), *_args())
    expected_buffer, buffer = _buffer(), _buffer()
    expected = write_both(*paged_caches(expected_buffer), *_args())
    (actual,) = merged(*paged_caches(buffer), *_args())
    assert torch.equal(actual, expected) and torch.equal(buffer, expected_buffer)
    states, _ = paged_caches(_buffer())
    _, rows = paged_caches(_buffer())
    with pytest.raises(AliasMismatchError, match="shared one storage at compile time"):
        merged(states, rows, *_args())
    with pytest.raises(AliasMismatchError, match="compiled as a view"):
        merged(states, rows[1:], *_args())
    bigger = torch.zeros(BLOCKS * PAGE + 8, dtype=torch.uint8)
    with pytest.raises(AliasMismatchError, match="bytes, compiled for"):
        merged(*paged_caches(bigger), *_args())
    slots = _args()[0]
    with pytest.raises(AliasMismatchError, match="did not share at compile time"):
        merged(*paged_caches(buffer), slots, buffer[:64].view(torch.float32).view(2, 8))
