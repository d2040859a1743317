"""The CUDA-oriented DeepSeek-V4 forward on CPU: it constructs under cuda_compat, its Dynamo graphs hold
every construct of the CUDA-only inventory (dsv4-reference.md section 5), and the native math of its
custom ops reproduces the oracle."""

from __future__ import annotations

import collections

import pytest
import torch

import dsv4_compile
from dsv4_compile.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4Model,
    new_cache,
    oracle_decode,
    oracle_prefill,
)
from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
from dsv4_compile.models.deepseek_v4.cuda_ops import STAND_IN_KERNELS, cpu_reference_kernels
from tests.conftest import capture_graph, needs_trace_time_retarget, targets

MHC_OPS = ("dsv4_cuda::mhc_pre", "dsv4_cuda::mhc_post", "dsv4_cuda::mhc_fused_post_pre", "dsv4_cuda::hc_head")


@pytest.fixture(scope="module")
def tiny_model() -> DeepseekV4Model:
    return DeepseekV4Model(DeepseekV4Config.tiny(), dtype=torch.float32)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _cuda_model(model: DeepseekV4Model) -> CudaDeepseekV4:
    with dsv4_compile.cuda_compat("cpu"):
        return CudaDeepseekV4(model)


def test_constructs_on_cpu_under_cuda_compat(tiny_model):
    cm = _cuda_model(tiny_model)
    assert len(cm.aux_streams) == 3
    assert len(cm.events) == tiny_model.config.num_hidden_layers
    assert cm.model is tiny_model


def test_custom_ops_have_no_cpu_kernel(tiny_model):
    h = torch.randn(3, 4, 64)
    layer = tiny_model.layers[0]
    with pytest.raises(NotImplementedError):
        torch.ops.dsv4_cuda.hc_head(h, tiny_model.hc_head_fn, tiny_model.hc_head_scale, tiny_model.hc_head_base,
                                    1e-6, 1e-6)
    with cpu_reference_kernels():  # test-only gate
        x, post, comb = torch.ops.dsv4_cuda.mhc_pre(h, layer.hc_attn_fn, layer.hc_attn_scale,
                                                    layer.hc_attn_base, 1e-6, 1e-6, 20)
    assert x.shape == (3, 64) and post.shape == (3, 4) and comb.shape == (3, 4, 4)
    with pytest.raises(NotImplementedError):  # the gate closed again
        torch.ops.dsv4_cuda.mhc_post(x, h, post, comb)
    assert set(STAND_IN_KERNELS) == {*MHC_OPS, "dsv4_cuda::get_mla_metadata", "dsv4_cuda::sparse_decode"}


def _counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(targets(gm))


def _assert_common(gm: torch.fx.GraphModule, cfg: DeepseekV4Config) -> collections.Counter:
    c = _counts(gm)
    experts = cfg.num_hidden_layers * (cfg.n_routed_experts + 1)  # routed run densely + shared
    assert c["_C::silu_and_mul_with_clamp"] == experts
    assert c["dsv4_cuda::mhc_pre"] == 1  # the first layer's attn pre; every later pre is fused
    assert c["dsv4_cuda::mhc_fused_post_pre"] == 2 * cfg.num_hidden_layers - 1
    assert c["dsv4_cuda::mhc_post"] == 1 and c["dsv4_cuda::hc_head"] == 1
    # fork/join: wq_a || wkv in every layer, compressor || indexer in ratio-4 layers
    forks = cfg.num_hidden_layers + sum(r == 4 for r in cfg.compress_ratios[: cfg.num_hidden_layers])
    assert c["streams::record_event"] == 2 * forks
    assert c["streams::wait_event"] == 2 * forks
    # On CPU Dynamo cannot trace user Triton kernels (has_triton() is False), so the PDL launchers
    # (save_partial_states, inv_rope) take their plain-torch fallback while tracing here.
    assert not any("triton_kernel_wrapper" in t for t in c)
    return c


def _assert_cuda_arange_retargeted(gm: torch.fx.GraphModule) -> None:
    # The indexer mask's hard-coded torch.arange(..., device="cuda") is retargeted to cpu at trace time.
    hard = [n for n in gm.graph.nodes
            if n.target is torch.arange and 'device="cuda"' in n.meta.get("stack_trace", "")]
    assert hard
    assert all(n.kwargs["device"] == torch.device("cpu") for n in hard)


@needs_trace_time_retarget
def test_prefill_graph_holds_the_inventory(tiny_model):
    cm = _cuda_model(tiny_model)
    gm, _ = capture_graph(cm.prefill, _ids(40, 0), new_cache(tiny_model))
    c = _assert_common(gm, tiny_model.config)
    assert c["dsv4_cuda::get_mla_metadata"] == 0 and c["dsv4_cuda::sparse_decode"] == 0
    _assert_cuda_arange_retargeted(gm)


@needs_trace_time_retarget
def test_decode_graph_holds_the_inventory(tiny_model):
    cm = _cuda_model(tiny_model)
    caches = [oracle_prefill(tiny_model, _ids(40, 1))[1], oracle_prefill(tiny_model, _ids(29, 2))[1]]
    gm, _ = capture_graph(cm.decode, _ids(2, 3), caches)
    c = _assert_common(gm, tiny_model.config)
    layers = tiny_model.config.num_hidden_layers
    assert c["dsv4_cuda::get_mla_metadata"] == layers
    assert c["dsv4_cuda::sparse_decode"] == layers
    _assert_cuda_arange_retargeted(gm)


def test_native_impls_reproduce_the_oracle(tiny_model):
    a, b = _ids(40, 4), _ids(23, 5)
    with dsv4_compile.cuda_compat("cpu"), cpu_reference_kernels():
        cm = CudaDeepseekV4(tiny_model)
        ref_a, oc_a = oracle_prefill(tiny_model, a)
        ref_b, oc_b = oracle_prefill(tiny_model, b)
        got_a, cc_a = cm.prefill(a)
        got_b, cc_b = cm.prefill(b)
        torch.testing.assert_close(got_a, ref_a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_b, ref_b, atol=1e-4, rtol=1e-4)
        ocs, ccs = [oc_a, oc_b], [cc_a, cc_b]
        for step in range(9):  # crosses ratio-4 and ratio-16 entry boundaries
            tok = _ids(2, 10 + step)
            torch.testing.assert_close(cm.decode(tok, ccs), oracle_decode(tiny_model, tok, ocs),
                                       atol=1e-4, rtol=1e-4)
        for oc, cc in zip(ocs, ccs, strict=True):
            assert cc.length == oc.length
            for ol, cl in zip(oc.layers, cc.layers, strict=True):
                assert cl.length == ol.length
                torch.testing.assert_close(cl.window, ol.window, atol=1e-5, rtol=1e-5)
                if ol.compressor is not None:
                    torch.testing.assert_close(cl.compressor.kv, ol.compressor.kv, atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(cl.compressor.entries, ol.compressor.entries,
                                               atol=1e-5, rtol=1e-5)


def test_mla_metadata_is_deterministic():
    with cpu_reference_kernels():
        lens = torch.tensor([5, 130, 64], dtype=torch.int32)
        meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(lens, 4, 512, 2)
        again = torch.ops.dsv4_cuda.get_mla_metadata(lens, 4, 512, 2)
    assert meta.dtype == splits.dtype == torch.int32
    assert meta.shape == (2, 8) and splits.shape == (4,)
    assert torch.equal(meta, again[0]) and torch.equal(splits, again[1])
    # blocks of 64 keys: 1 + 3 + 1 = 5 -> parts [0, 3), [3, 5)
    assert meta[:, :2].tolist() == [[0, 3], [3, 5]]
    assert splits.tolist() == [0, 1, 3, 4]
