"""The tensorized fixed-capacity path of the CUDA-oriented DeepSeek-V4 forward (``StaticCache`` +
``CudaDeepseekV4.forward_static``): it reproduces the oracle (fp32 tiny model, 1e-4 like
test_dsv4_cuda_layer.py) for prefill, chunked prefill and batched decode of slots at different
lengths, and under ``dsv4_compile.compile`` one graph per mode serves every decode position, batch size
and prefill length (no recompiles after warm-up)."""

from __future__ import annotations

import collections

import pytest
import torch

import dsv4_compile
from dsv4_compile.models.deepseek_v4 import DeepseekV4Config, DeepseekV4Model, oracle_decode, oracle_prefill
from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
from dsv4_compile.models.deepseek_v4.cuda_ops import cpu_reference_kernels
from dsv4_compile.models.deepseek_v4.static_cache import (
    StaticCache,
    decode_inputs,
    mark_tokens_dynamic,
    prefill_inputs,
)
from tests.conftest import capture_graph, needs_trace_time_retarget, targets

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_model() -> DeepseekV4Model:
    return DeepseekV4Model(DeepseekV4Config.tiny(), dtype=torch.float32)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_static_cache_shapes(tiny_model):
    cfg = tiny_model.config
    cache = StaticCache(tiny_model, max_seq_len=64, num_slots=3)
    assert cache.lengths.shape == (4,) and cache.trash == 3  # + trash slot
    w = cfg.sliding_window
    assert [tuple(t.shape) for t in cache.kv] == [(4, w, 32), (4, w + 16, 32), (4, w + 4, 32), (4, w + 16, 32)]
    assert cache.comp_kv[0] is None and tuple(cache.comp_kv[1].shape) == (4, 8, 64)
    assert tuple(cache.comp_kv[2].shape) == (4, 16, 32)
    assert cache.index_keys[2] is None and tuple(cache.index_keys[3].shape) == (4, 16, 32)


def test_static_eager_matches_oracle(tiny_model):
    m = tiny_model
    with dsv4_compile.cuda_compat("cpu"), cpu_reference_kernels():
        cm = CudaDeepseekV4(m)
        cache = StaticCache(m, max_seq_len=64, num_slots=3)
        ocs = []
        for slot, chunks in enumerate([[40], [23], [17, 12]]):  # slot 2: chunked prefill
            oc = None
            for j, n in enumerate(chunks):
                a = _ids(n, 10 * slot + j)
                ref, oc = oracle_prefill(m, a, oc)
                got = cm.prefill_static(a, *prefill_inputs(cache, slot, n), cache)
                torch.testing.assert_close(got, ref, **TOL)
            ocs.append(oc)
        assert cache.lengths.tolist() == [40, 23, 29, 0]
        # 9 steps cross ratio-4 and ratio-16 entry boundaries and evict window rows; slot order varies
        for step in range(9):
            slots = torch.tensor([2, 0, 1] if step % 2 else [0, 1, 2])
            tok = _ids(3, 100 + step)
            ref = oracle_decode(m, tok, [ocs[s] for s in slots.tolist()])
            torch.testing.assert_close(cm.decode_static(tok, *decode_inputs(cache, slots), cache), ref, **TOL)
        slots = torch.tensor([1])  # a subset of the slots
        tok = _ids(1, 200)
        ref = oracle_decode(m, tok, [ocs[1]])
        torch.testing.assert_close(cm.decode_static(tok, *decode_inputs(cache, slots), cache), ref, **TOL)
        assert cache.lengths.tolist() == [49, 33, 38, 0]
        # converter: an oracle cache loaded into a fresh static cache continues identically
        loaded = StaticCache(m, max_seq_len=64, num_slots=2)
        loaded.load_sequence(1, ocs[0])
        loaded.load_sequence(0, ocs[2])
        slots = torch.tensor([1, 0])
        for step in range(5):
            tok = _ids(2, 300 + step)
            ref = oracle_decode(m, tok, [ocs[0], ocs[2]])
            torch.testing.assert_close(cm.decode_static(tok, *decode_inputs(loaded, slots), loaded), ref, **TOL)
        # a freed slot serves a new sequence
        cache.reset(0)
        a = _ids(21, 400)
        ref, _ = oracle_prefill(m, a)
        torch.testing.assert_close(cm.prefill_static(a, *prefill_inputs(cache, 0, 21), cache), ref, **TOL)


def test_compiled_static_path_does_not_recompile(tiny_model):
    m = tiny_model
    with dsv4_compile.cuda_compat("cpu"):
        cm = CudaDeepseekV4(m)
    cache = StaticCache(m, max_seq_len=64, num_slots=8)
    prefill = dsv4_compile.compile(cm.prefill_static, inductor=False, fullgraph=True)
    decode = dsv4_compile.compile(cm.decode_static, inductor=False, fullgraph=True)
    stats = torch._dynamo.utils.counters["stats"]
    ocs: dict[int, object] = {}

    def run_prefill(slot: int, n: int) -> None:
        a = _ids(n, 500 + slot)
        ref, ocs[slot] = oracle_prefill(m, a)
        got = prefill(*mark_tokens_dynamic(a, *prefill_inputs(cache, slot, n)), cache)
        torch.testing.assert_close(got, ref, **TOL)

    def run_decode(slots: list[int], seed: int) -> None:
        tok = _ids(len(slots), seed)
        ref = oracle_decode(m, tok, [ocs[s] for s in slots])
        got = decode(*mark_tokens_dynamic(tok, *decode_inputs(cache, torch.tensor(slots))), cache)
        torch.testing.assert_close(got, ref, **TOL)

    # warm-up: one prefill and one decode step compile one graph each
    before = stats["unique_graphs"]
    run_prefill(0, 40)
    run_prefill(1, 23)
    run_decode([0, 1], 600)
    assert stats["unique_graphs"] - before == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for slot, n in [(2, 29), (3, 17), (4, 1), (5, 33), (6, 12), (7, 20)]:  # new prefill lengths, T = 1 included
            run_prefill(slot, n)
        for step, slots in enumerate([[1], [0, 1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0], [3, 2], list(range(8)),
                                      [2], [4, 0, 5, 1], [6, 7]]):
            run_decode(slots, 700 + step)  # batch sizes 1, 2, 4, 8; positions crossing entry boundaries
    assert stats["unique_graphs"] - before == 2


@needs_trace_time_retarget
@pytest.mark.parametrize("decode", [False, True])
def test_static_graph_keeps_the_cuda_inventory(tiny_model, decode):
    cfg = tiny_model.config
    with dsv4_compile.cuda_compat("cpu"):
        cm = CudaDeepseekV4(tiny_model)
    cache = StaticCache(tiny_model, max_seq_len=64, num_slots=2)
    if decode:
        args = (_ids(2, 1), torch.tensor([5, 9]), torch.tensor([0, 1]), cache)
        fn = cm.decode_static
    else:
        args = (_ids(12, 1), torch.arange(12), torch.zeros(12, dtype=torch.int64), cache)
        fn = cm.prefill_static
    gm, _ = capture_graph(fn, *args)
    c = collections.Counter(targets(gm))
    layers = cfg.num_hidden_layers
    assert c["_C::silu_and_mul_with_clamp"] == layers * (cfg.n_routed_experts + 1)
    assert c["dsv4_cuda::mhc_pre"] == 1 and c["dsv4_cuda::mhc_fused_post_pre"] == 2 * layers - 1
    assert c["dsv4_cuda::mhc_post"] == 1 and c["dsv4_cuda::hc_head"] == 1
    forks = layers + sum(r == 4 for r in cfg.compress_ratios[:layers])
    assert c["streams::record_event"] == 2 * forks and c["streams::wait_event"] == 2 * forks
    assert c["dsv4_cuda::get_mla_metadata"] == c["dsv4_cuda::sparse_decode"] == (layers if decode else 0)
    hard = [n for n in gm.graph.nodes
            if n.target is torch.arange and 'device="cuda"' in n.meta.get("stack_trace", "")]
    assert len(hard) == sum(r == 4 for r in cfg.compress_ratios[:layers])
    assert all(n.kwargs["device"] == torch.device("cpu") for n in hard)
    assert not cache.lengths.any()  # tracing only: nothing ran
