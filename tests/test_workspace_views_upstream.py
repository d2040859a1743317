"""Upstream reproducer (torch 2.13, AOTAutograd): dtype views of slices of one uint8 buffer, reshaped and
returned from a graph compiled with dynamic shapes, come back with the wrong shape. This is what vLLM's
WorkspaceManager.get_simultaneous (v1/worker/workspace.py:193-207) does; eager is right, and so is a view that
is used inside the graph. dsv4_compile answers vLLM's workspace with plain allocations at trace time
(frontend/ops/vllm_workspace.py) rather than depend on this. When torch fixes it, the xfail below passes and
fails the run (strict): then the workaround can be reconsidered.
"""

from __future__ import annotations

import pytest
import torch


def scratch_views(buffer: torch.Tensor, chunk: int, rows: int, width: int, tokens: int, topk: int):
    shapes = (((chunk, rows, width), torch.bfloat16), ((tokens, topk), torch.int32), ((tokens,), torch.int32))
    views, offset = [], 0
    for shape, dtype in shapes:
        size = torch.Size(shape).numel() * dtype.itemsize
        views.append(buffer[offset: offset + size].view(dtype).reshape(shape))
        offset += -(-size // 256) * 256
    return views


def returned_shapes(backend: str) -> list[tuple[int, ...]]:
    torch._dynamo.reset()
    compiled = torch.compile(scratch_views, backend=backend, dynamic=True)
    buffer = torch.zeros(4 << 20, dtype=torch.uint8)
    return [tuple(compiled(buffer, 3, rows, 512, 512, 640)[0].shape) for rows in (130, 162, 131)]


EXPECTED = [(3, 130, 512), (3, 162, 512), (3, 131, 512)]


def test_eager_views_have_the_shapes_asked_for():
    assert returned_shapes("eager") == EXPECTED


@pytest.mark.xfail(strict=True, reason="torch AOTAutograd: a returned dtype view of a graph input gets the wrong "
                                       "shape under dynamic shapes")
def test_aot_autograd_returns_the_shapes_asked_for():
    assert returned_shapes("aot_eager") == EXPECTED
