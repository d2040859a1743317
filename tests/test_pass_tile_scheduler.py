import torch

from dsv4_compile.models.deepseek_v4 import cuda_ops  # noqa: F401 - defines the dsv4_cuda ops
from dsv4_compile.passes.audit import find_cuda_only_nodes
from dsv4_compile.passes.base import PassContext
from dsv4_compile.passes.tile_scheduler import short_circuit_tile_scheduler
from tests.conftest import capture_graph, targets

CTX = PassContext(device=torch.device("cpu"))


def decode(seq_lens, q, kv, indices, sink):
    meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(seq_lens, q.shape[1], indices.shape[1], 8)
    return torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, meta, splits, q.shape[-1] ** -0.5)


def slow_sparse_decode(q, kv, indices, sink, scale):
    """One (sequence, head) at a time: softmax over the valid candidates plus the sink logit."""
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(q.shape[0]):
        keys = kv[[int(i) for i in indices[b] if i >= 0]].double()
        for h in range(q.shape[1]):
            logits = torch.cat([keys @ q[b, h].double() * scale, sink[h].double().reshape(1)])
            out[b, h] = logits.softmax(0)[:-1] @ keys
    return out


def test_scheduler_disappears_and_decode_is_native():
    torch.manual_seed(0)
    q, kv = torch.randn(3, 4, 32), torch.randn(20, 32)
    indices = torch.tensor([[0, 5, 7, -1], [1, 2, 3, 4], [-1, -1, 19, 10]], dtype=torch.int32)
    sink, seq_lens = torch.randn(4), torch.tensor([3, 4, 2], dtype=torch.int32)
    gm, inputs = capture_graph(decode, seq_lens, q, kv, indices, sink)
    assert {"dsv4_cuda::get_mla_metadata", "dsv4_cuda::sparse_decode"} <= set(targets(gm))
    result = short_circuit_tile_scheduler(gm, CTX)
    gm.graph.lint()
    gm.recompile()
    assert (result.matched, result.changed) == (2, 2)
    assert not any(t.startswith("dsv4_cuda::") for t in targets(gm))
    assert not any(t == "_operator.getitem" for t in targets(gm))
    assert find_cuda_only_nodes(gm, CTX.device) == []
    expected = slow_sparse_decode(q, kv, indices, sink, 32**-0.5)
    torch.testing.assert_close(gm(*inputs)[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert short_circuit_tile_scheduler(gm, CTX).matched == 0


def test_scheduler_used_elsewhere_is_left_for_the_audit():
    def leaky(seq_lens, q, kv, indices, sink):
        meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(seq_lens, q.shape[1], indices.shape[1], 8)
        out = torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, meta, splits, 1.0)
        return out, splits

    args = (torch.tensor([1], dtype=torch.int32), torch.randn(1, 2, 8), torch.randn(4, 8),
            torch.tensor([[0, 1]], dtype=torch.int32), torch.randn(2))
    gm, _ = capture_graph(leaky, *args)
    result = short_circuit_tile_scheduler(gm, CTX)
    assert result.matched == 2 and result.changed == 1
    reasons = [why for _, why in find_cuda_only_nodes(gm, CTX.device)]
    assert any("get_mla_metadata has no cpu kernel" in r for r in reasons)
