"""The pieces the plugin gives vLLM's engine off CUDA, each on vLLM's real modules (the whole engine runs in
test_vllm_engine.py, the `engine` tier)."""

from __future__ import annotations

import inspect

import pytest
import torch

import dsv4_compile
from dsv4_compile.integrations import vllm_engine


def test_the_nvidia_path_class_takes_vllms_constructor_arguments():
    """vLLM's initialize_model calls a class with (vllm_config=, prefix=) only when its __init__ names them."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM

    model_class = vllm_engine.DeepseekV4ForCausalLMNvidiaPath
    assert issubclass(model_class, DeepseekV4ForCausalLM)
    parameters = inspect.signature(model_class.__init__).parameters
    assert {"vllm_config", "prefix"} <= set(parameters)
    assert parameters["vllm_config"].kind is inspect.Parameter.KEYWORD_ONLY


class RecordingBuilder:
    """An attention-metadata builder that records what torch.cuda answers while it builds."""

    def __init__(self, *args, **kwargs):
        pass

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return {"capturing": torch.cuda.is_current_stream_capturing(), "stream": type(torch.cuda.current_stream())}


class RecordingBackend:
    @staticmethod
    def get_builder_cls():
        return RecordingBuilder


def test_metadata_builds_under_cuda_compat_and_only_there():
    compat = vllm_engine.backend_building_under_cuda_compat(RecordingBackend, "cpu")
    assert issubclass(compat, RecordingBackend) and compat.__name__ == "RecordingBackend"
    assert vllm_engine.backend_building_under_cuda_compat(RecordingBackend, "cpu") is compat  # one per backend
    built = compat.get_builder_cls()().build(0, None)
    from dsv4_compile.frontend.cuda_compat import CompatStream

    assert built == {"capturing": False, "stream": CompatStream}
    # the original builder, outside: CPU torch has no CUDA stream API
    with pytest.raises((AssertionError, RuntimeError)):
        RecordingBuilder().build(0, None)


def test_workspace_is_plain_scratch_at_trace_time():
    from vllm.models.deepseek_v4.nvidia import flashmla
    from vllm.v1.worker import workspace

    original = flashmla.current_workspace_manager
    with dsv4_compile.cuda_compat("cpu"):
        kv, indices, lens = flashmla.current_workspace_manager().get_simultaneous(
            ((3, 162, 512), torch.bfloat16), ((512, 640), torch.int32), ((512,), torch.int32))
    assert flashmla.current_workspace_manager is original is workspace.current_workspace_manager
    assert (kv.shape, kv.dtype, indices.shape, indices.dtype, lens.shape) == (
        (3, 162, 512), torch.bfloat16, (512, 640), torch.int32, (512,))
    assert kv.untyped_storage().data_ptr() != indices.untyped_storage().data_ptr()


def test_compiled_workspace_views_keep_their_shapes_with_dynamic_shapes():
    """The upstream view bug (tests/test_workspace_views_upstream.py) does not reach code compiled by dsv4_xpu
    under cuda_compat: the scratch tensors are allocations, whatever the sizes."""
    from vllm.models.deepseek_v4.nvidia import flashmla

    def scratch(chunk: int, rows: int) -> list[torch.Tensor]:
        return flashmla.current_workspace_manager().get_simultaneous(((chunk, rows, 512), torch.bfloat16),
                                                                     ((512, 640), torch.int32))

    torch._dynamo.reset()
    compiled = torch.compile(scratch, backend="dsv4_xpu", dynamic=True)
    with dsv4_compile.cuda_compat("cpu"):
        shapes = [tuple(compiled(3, rows)[0].shape) for rows in (130, 162, 131)]
    assert shapes == [(3, 130, 512), (3, 162, 512), (3, 131, 512)]


def sqrt_softplus64(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    return torch.sqrt(torch.where(x > 20, x, torch.log1p(torch.exp(x))))


def routing_kernel(name: str, which: str):
    """vLLM's CPU routing kernel `name` as the engine calls it, or the project's kernel registered where vLLM's
    library lacks it (called directly, so it is tested on a CPU whose vLLM library has its own)."""
    import vllm._custom_ops as ops

    from dsv4_compile.frontend.ops import vllm_routing
    from dsv4_compile.frontend.ops.vllm import ensure_vllm_ops

    ensure_vllm_ops()
    return getattr(ops if which == "engine's" else vllm_routing, name)


@pytest.mark.parametrize("which", ["engine's", "project's"])
@pytest.mark.parametrize("seed", [0, 3])
def test_cpu_hash_routing_is_the_formula(seed, which):
    """`_C::hash_topk_cpu`: the experts of each token's table row, weighted by their sqrt-softplus scores, summing
    to the scaling factor."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(9, 64, generator=generator) * 3
    table = torch.randint(0, 64, (9, 6), generator=generator, dtype=torch.int32)
    weights, experts = routing_kernel("hash_topk_cpu", which)(logits, table, 6, "sqrtsoftplus", 0, 64, 1.5)
    scores = sqrt_softplus64(logits).gather(1, table.long())
    torch.testing.assert_close(weights.double(), 1.5 * scores / scores.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.equal(experts, table)


@pytest.mark.parametrize("which", ["engine's", "project's"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_cpu_biased_routing_is_the_formula(renormalize, which):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 64, generator=generator) * 2
    bias = torch.randn(64, generator=generator)
    biased_topk = routing_kernel("biased_topk_cpu", which)
    weights, experts = biased_topk(logits, logits, bias, 6, renormalize, "sqrtsoftplus", 0, 2.5, True)
    scores = sqrt_softplus64(logits)
    chosen = (scores + bias.double()).topk(6, dim=-1).indices
    assert torch.equal(experts.long().sort(-1).values, chosen.sort(-1).values)
    picked = scores.gather(1, experts.long())
    # vLLM's kernel applies the scaling factor to renormalised weights only (unlike its CUDA routing op).
    expected = 2.5 * picked / picked.sum(-1, keepdim=True) if renormalize else picked
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)


def test_cpu_port_class_answers_every_tile_scheduler_key():
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM

    assert vllm_engine.DeepseekV4ForCausalLMCpuPort is DeepseekV4ForCausalLM
    plan = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler(None, 3)
    assert set(plan) >= {"swaonly", "c4a", "c128a", "c1a", "c2a"} and set(plan.values()) == {None}


def test_kv_caches_are_marked_static():
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    class Layer(AttentionLayerBase, torch.nn.Module):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.kv_cache = torch.zeros(4, 8)

        def get_attn_backend(self):
            return None

        def get_kv_cache_spec(self, vllm_config):
            return None

    model = torch.nn.Sequential(Layer(), Layer())
    assert vllm_engine.mark_kv_caches_static(model) == 2
    assert all(layer.kv_cache._dynamo_static_indices == {0, 1} for layer in model)


def test_the_engines_dynamo_counts_see_a_recompile():
    from dsv4_compile.tools.vllm_engine import dynamo_counts, keep_compilation_metrics

    keep_compilation_metrics()
    torch._dynamo.reset()
    before = dynamo_counts()
    compiled = torch.compile(lambda x, n: x * n, backend="eager", dynamic=False)
    compiled(torch.ones(2), 2)
    compiled(torch.ones(2), 3)  # the int is specialised: a new graph, with a recompile reason
    after = dynamo_counts()
    assert after["recompiles"] - before["recompiles"] == 1
    assert after["unique_graphs"] - before["unique_graphs"] == 2
