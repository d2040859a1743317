import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.cuda_compat import CompatStream, cuda_compat
from tests.conftest import needs_trace_time_retarget


class StreamsInInit(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.aux_streams = [torch.cuda.Stream() for _ in range(3)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        assert x.is_cuda, "CUDA-only code path"
        mask = torch.arange(4, device="cuda") < 2
        y = (x * self.scale).cuda() + torch.ones(4).to("cuda") + torch.zeros(4, device=torch.device("cuda:0"))
        torch.cuda.synchronize()
        return torch.where(mask, y, -y)


def expected(x):
    y = x + 1
    return torch.where(torch.arange(4) < 2, y, -y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour on a machine without CUDA")
def test_cuda_streams_fail_without_compat():
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        StreamsInInit()


def test_constructs_and_runs_eagerly_under_compat():
    with cuda_compat("cpu") as device:
        model = StreamsInInit()
        assert device == torch.device("cpu")
        assert all(isinstance(s, CompatStream) for s in model.aux_streams)
        x = torch.randn(3, 4)
        torch.testing.assert_close(model(x), expected(x))
        with torch.cuda.stream(model.aux_streams[0]):
            model.aux_streams[0].wait_stream(torch.cuda.current_stream())
            model.events[0].record()
            model.events[0].wait()


@needs_trace_time_retarget
def test_traces_under_dynamo_with_fullgraph():
    with cuda_compat("cpu"):
        model = StreamsInInit()
        x = torch.randn(3, 4)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected(x))


def test_patches_are_undone_and_dynamo_tables_keep_the_real_functions():
    from torch._dynamo import trace_rules

    originals = {name: getattr(torch.cuda, name) for name in ("Stream", "Event", "current_stream", "stream")}
    with cuda_compat("cpu"):
        assert torch.cuda.Stream is CompatStream
    assert {name: getattr(torch.cuda, name) for name in originals} == originals
    assert torch.cuda.current_stream in trace_rules.get_torch_obj_rule_map()
    assert not torch._C._is_torch_function_mode_enabled() or not torch.overrides._get_current_function_mode_stack()


def test_cuda_target_is_a_no_op():
    original = torch.cuda.Stream
    with cuda_compat("cuda"):
        assert torch.cuda.Stream is original


@needs_trace_time_retarget
def test_compile_wraps_calls_in_compat():
    with cuda_compat("cpu"):
        model = StreamsInInit()
    compiled = dsv4_compile.compile(model, fullgraph=True)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), expected(x))
