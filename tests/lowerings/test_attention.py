"""Attention family: `dsv4_cuda::sparse_decode(q, kv, indices, attn_sink, tile_scheduler_metadata, num_splits,
scale)`, fed by the CUDA tile scheduler `dsv4_cuda::get_mla_metadata`.

The lowering ignores the scheduler's outputs, so the scheduler goes with the decode. Oracle: the softmax with a
per-head sink written here in fp64, one (sequence, head) at a time. The dsv4_cuda ops have no CPU kernel: only
the rewritten graph runs here.
"""

import pytest
import torch

import dsv4_compile.models.deepseek_v4  # noqa: F401 - defines the dsv4_cuda ops
from dsv4_compile.errors import CudaOnlyNodesError
from dsv4_compile.lowering.pipeline import run_pipeline
from tests.blocks import slow_sparse_decode
from tests.conftest import lower_graph_testing, op_counts

DECODE, SCHEDULER = "dsv4_cuda::sparse_decode", "dsv4_cuda::get_mla_metadata"
CPU = torch.device("cpu")


def decode(seq_lens, q, kv, indices, sink):
    meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(seq_lens, q.shape[1], indices.shape[1], 8)
    return torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, meta, splits, q.shape[-1] ** -0.5)


def decode_without_scheduler(seq_lens, q, kv, indices, sink):
    return torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, None, None, q.shape[-1] ** -0.5)


def make_inputs(b=4, heads=4, d=32, n=40, k=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, d, generator=gen).to(dtype)
    kv = torch.randn(n, d, generator=gen).to(dtype)
    indices = torch.randint(0, n, (b, k), generator=gen, dtype=torch.int32)
    if b > 2:
        indices[0, 1:3] = -1  # missing candidates
        indices[1, 2] = indices[1, 3]  # a key picked twice counts twice
        indices[2] = -1  # nothing to attend to: zeros
    sink = 2 * torch.randn(heads, generator=gen)
    seq_lens = torch.randint(1, 300, (b,), generator=gen, dtype=torch.int32)
    return seq_lens, q, kv, indices, sink


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scheduler_goes_and_the_decode_is_native(dtype):
    args = make_inputs(dtype=dtype)
    _, q, kv, indices, sink = args
    lo = lower_graph_testing(decode, *args, expected_before=[DECODE, SCHEDULER, "getitem"],
                             expected_after=["sparse_decode_native"],
                             unexpected_after=["dsv4_cuda::", "getitem"])
    assert (lo.before[DECODE], lo.before[SCHEDULER], lo.before["getitem"]) == (1, 1, 2)
    assert lo.after == {"sparse_decode_native": 1}
    row = lo.report["attention"]
    assert row.matched == 1 and row.changed >= 2  # the decode, and the scheduler it no longer needs
    assert lo.report["audit"].matched == 0

    (out,) = lo.run()
    assert out.shape == q.shape and out.dtype == dtype
    expected = slow_sparse_decode(q, kv, indices, sink, q.shape[-1] ** -0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    else:  # bf16 operands are exact in fp32; one rounding of the output
        torch.testing.assert_close(out, expected.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # all indices -1: the sink takes everything
    assert not out.isnan().any()


def test_sink_and_masking():
    """Hand-checkable: one key, and a missing one that must not count."""
    q = torch.ones(1, 2, 4)
    kv = torch.tensor([[1.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    indices = torch.tensor([[0, -1]], dtype=torch.int32)
    sink = torch.tensor([0.0, float("-inf")])  # head 0: the sink's share is dropped; head 1: no sink at all
    seq_lens = torch.tensor([1], dtype=torch.int32)
    (out,) = lower_graph_testing(decode, seq_lens, q, kv, indices, sink, unexpected_after=["dsv4_cuda::"]).run()
    p0 = torch.sigmoid(torch.tensor(0.5)).item()  # exp(s) / (exp(s) + exp(0)), s = 1 * 4 ** -0.5
    torch.testing.assert_close(out[0, 0], p0 * kv[0])
    torch.testing.assert_close(out[0, 1], kv[0])


def test_decode_without_a_scheduler():
    args = make_inputs(b=3, seed=1)
    lo = lower_graph_testing(decode_without_scheduler, *args, expected_before=[DECODE],
                             unexpected_after=["dsv4_cuda::"])
    assert (lo.report["attention"].matched, lo.report["attention"].changed) == (1, 1)
    _, q, kv, indices, sink = args
    expected = slow_sparse_decode(q, kv, indices, sink, 32**-0.5)
    torch.testing.assert_close(lo.run()[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_zero_sequences():
    seq_lens, q, kv, indices, sink = make_inputs(b=0)
    (out,) = lower_graph_testing(decode, seq_lens, q, kv, indices, sink, unexpected_after=["dsv4_cuda::"]).run()
    assert out.shape == (0, 4, 32)


def test_second_run_changes_nothing():
    lo = lower_graph_testing(decode, *make_inputs(b=2), unexpected_after=["dsv4_cuda::"])
    code = lo.gm.code
    again = run_pipeline(lo.gm, CPU)
    assert again.get("attention") is None or (again["attention"].matched, again["attention"].changed) == (0, 0)
    assert lo.gm.code == code and op_counts(lo.gm) == lo.after


def leaky(seq_lens, q, kv, indices, sink):
    meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(seq_lens, q.shape[1], indices.shape[1], 8)
    out = torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, meta, splits, 1.0)
    return out, splits


def test_scheduler_used_elsewhere_stays_and_the_audit_flags_it():
    args = make_inputs(b=2, seed=2)
    with pytest.warns(UserWarning, match="get_mla_metadata has no cpu kernel"):
        lo = lower_graph_testing(leaky, *args, expected_after=[SCHEDULER, "sparse_decode_native"],
                                 unexpected_after=[DECODE], strict=False)
    assert lo.after[SCHEDULER] == 1 and lo.after["getitem"] == 1  # only the schedule's unused half went
    assert lo.report["attention"].matched == 1
    assert lo.report["audit"].matched >= 1


def test_scheduler_used_elsewhere_fails_a_strict_rewrite():
    with pytest.raises(CudaOnlyNodesError, match=r"node 'get_mla_metadata'[\s\S]*get_mla_metadata has no cpu kernel"):
        lower_graph_testing(leaky, *make_inputs(b=2, seed=2))
