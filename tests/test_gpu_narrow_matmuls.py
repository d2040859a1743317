"""Pass `narrow_matmuls` on a CUDA GPU: the attention-score and projection matmuls of widened bf16 values compile
to narrow matmuls with fp32 results (cuBLAS bf16 GEMMs, fp32 accumulation), within the error bound of an fp32 sum
of the exact products, against fp64."""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLAS' narrow GEMMs)"),
]


def scores_and_projection(q, keys, x, w):
    return torch.einsum("thd,kd->thk", q.float(), keys.float()), x.float() @ w.float().T


def test_widened_matmuls_run_narrow_and_as_accurately(caplog):
    gen = torch.Generator().manual_seed(0)
    shapes = ((256, 8, 512), (640, 512), (256, 4096), (512, 4096))
    inputs = [torch.randn(*s, generator=gen).bfloat16().cuda() for s in shapes]
    compiled = torch.compile(scores_and_projection, backend="dsv4_xpu")
    with (caplog.at_level(logging.INFO, logger="dsv4_compile.lowering.passes.narrow_matmuls"),
          torch._inductor.config.patch(fx_graph_cache=False)):  # a cached graph would skip the post-grad passes
        scores, projected = compiled(*inputs)
    assert "narrow_matmuls: 2 fp32 matmul(s)" in caplog.text, caplog.text
    q, keys, x, w = (t.double() for t in inputs)
    expected = (torch.einsum("thd,kd->thk", q, keys), x @ w.T)
    magnitudes = (torch.einsum("thd,kd->thk", q.abs(), keys.abs()), x.abs() @ w.abs().T)
    for narrow, exact, magnitude, k in zip((scores, projected), expected, magnitudes, (512, 4096), strict=True):
        assert narrow.dtype == torch.float32
        # exact products summed in fp32 in any order, truncating or rounding: |error| <= k 2^-23 sum|a b|;
        # a sum carried in bf16 would be off by about 2^-8 of it
        error = (narrow.double() - exact).abs()
        assert (error <= k * 2.0 ** -23 * magnitude + 1e-30).all(), (error / magnitude).max().item()
