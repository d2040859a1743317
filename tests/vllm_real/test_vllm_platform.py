"""vllm_platform.cuda_capability_of_lowered_path on vLLM's real CPU platform, and through cuda_compat."""

import pytest
import torch

from dsv4_compile.frontend.cuda_compat import cuda_compat
from dsv4_compile.frontend.vllm_platform import LOWERED_CUDA_CAPABILITY, cuda_capability_of_lowered_path


@pytest.fixture
def platform():
    from vllm.platforms import current_platform

    assert not current_platform.is_cuda(), "this tier runs on vLLM's CPU build"
    return current_platform


def test_capability_is_hopper_inside_cuda_compat_and_none_outside(platform):
    own_before = type(platform).__dict__.get("get_device_capability")
    assert platform.get_device_capability() is None
    with cuda_compat("cpu"):
        assert tuple(platform.get_device_capability()) == LOWERED_CUDA_CAPABILITY == (9, 0)
        assert platform.has_device_capability(90) and platform.has_device_capability((8, 9))
        assert not platform.has_device_capability(100)
        assert platform.is_device_capability(90) and platform.is_device_capability_family(90)
        assert not platform.is_device_capability_family(100)
        assert not platform.is_cuda()
    assert platform.get_device_capability() is None
    assert type(platform).__dict__.get("get_device_capability") is own_before


def test_nested_blocks_restore_the_outer_answer(platform):
    with cuda_capability_of_lowered_path((10, 0)):
        assert platform.is_device_capability_family(100)
        with cuda_compat("cpu"):
            assert tuple(platform.get_device_capability()) == (9, 0)
        assert tuple(platform.get_device_capability()) == (10, 0)
    assert platform.get_device_capability() is None


def test_o_proj_recipe_needs_a_capability_and_gets_hopper_s(platform):
    from vllm.models.deepseek_v4.nvidia.ops.o_proj import compute_fp8_einsum_recipe

    with pytest.raises(AssertionError, match="requires a CUDA device"):
        compute_fp8_einsum_recipe()
    with cuda_compat("cpu"):
        assert compute_fp8_einsum_recipe() == ((1, 128, 128), False)


@pytest.mark.parametrize(("capability", "expected"), [
    ((9, 0), "DeepseekV4FlashMLAAttention"), ((12, 0), "DeepseekV4FlashInferSM120Attention")])
def test_nvidia_attention_class_follows_the_capability(platform, vllm_config, capability, expected):
    from vllm.models.deepseek_v4.nvidia.model import _select_dsv4_attn_cls

    with cuda_capability_of_lowered_path(capability):
        assert _select_dsv4_attn_cls(vllm_config).__name__ == expected


def test_capability_is_answered_while_dynamo_traces(platform):
    def branch(x):
        capability = platform.get_device_capability()
        return x * capability.major + capability.minor

    with cuda_compat("cpu"):
        out = torch.compile(branch, backend="eager", fullgraph=True)(torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 9.0))
