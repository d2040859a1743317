import logging

import pytest
import torch

import dsv4_compile
from dsv4_compile import BackendOptions, DeviceError, OptionsError
from dsv4_compile.lowering.backend import dsv4_xpu, resolve_device
from dsv4_compile.lowering.pipeline import pass_names
from tests.blocks import CudaOrientedBlock, native_block
from tests.conftest import capture_graph, needs_trace_time_retarget


def test_backend_is_registered_by_entry_point():
    assert "dsv4_xpu" in torch._dynamo.list_backends(exclude_tags=())
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("dsv4_xpu") is dsv4_xpu


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"devcie": "cpu"}, r"unknown dsv4_xpu option\(s\) \['devcie'\]; valid options are \['device', 'strict'"),
        ({"disable": ["no_such_pass"]},
         r"unknown pass\(es\) \['no_such_pass'\]; passes are \['aux_streams'.*op families are \[.*'activation'"),
        ({"disable": ["audit"]}, "cannot be disabled"),
        ({"strict": "yes"}, "must be bool"),
        ({"cudagraphs": 1}, "'cudagraphs' must be bool"),
        ({"device": "tpu"}, "unknown device 'tpu'|unsupported target device 'tpu'"),
        ({"device": "meta"}, "unsupported target device 'meta'"),
    ],
)
def test_bad_options_are_rejected_with_the_valid_choices(options, message):
    with pytest.raises(OptionsError if "device" not in options else DeviceError, match=message):
        BackendOptions.from_mapping(options)


def test_cudagraphs_option_turns_on_inductors_cudagraph_trees_only():
    from dsv4_compile.lowering.backend import inductor_config_patches

    assert inductor_config_patches(BackendOptions()) == {"emulate_precision_casts": True}
    assert inductor_config_patches(BackendOptions(cudagraphs=True)) == {"emulate_precision_casts": True,
                                                                        "triton.cudagraphs": True}
    assert inductor_config_patches(BackendOptions(cudagraphs=True, exact_rounding=False)) == {
        "triton.cudagraphs": True}


def test_device_defaults_to_the_inputs_and_rejects_mixtures():
    assert resolve_device(None, [torch.ones(2), torch.tensor(3.0)]) == torch.device("cpu")
    with pytest.raises(DeviceError, match="several devices"):
        resolve_device(None, [torch.ones(2), torch.ones(2, device="meta")])
    with pytest.raises(DeviceError, match="inputs live on cpu"):
        resolve_device("xpu", [torch.ones(2)])
    if not torch.xpu.is_available():
        with pytest.raises(DeviceError, match="'xpu' is not available"):
            resolve_device("xpu", [])


def block_and_input():
    with dsv4_compile.cuda_compat("cpu"):
        block = CudaOrientedBlock(hidden=32, intermediate=64, seed=0)
    return block, torch.randn(5, 32)


@needs_trace_time_retarget
def test_compile_by_name_rewrites_and_reports(caplog):
    block, x = block_and_input()
    with caplog.at_level(logging.INFO, logger="dsv4_compile"), dsv4_compile.cuda_compat("cpu"):
        out = torch.compile(block, backend="dsv4_xpu", options={"strict": True}, fullgraph=True)(x)
    torch.testing.assert_close(out, native_block(block, x), rtol=1e-4, atol=1e-4)
    report = dsv4_compile.last_report()
    assert [s.name for s in report.passes] == list(pass_names())
    assert report["activation"].changed == 1
    assert report["aux_streams"].changed > 0
    assert report["audit"].matched == 0
    text = str(report)
    assert "lower_ops" in text and "activation" in text and "matched" in text and "changed" in text
    assert any("dsv4_xpu rewrite of graph" in r.getMessage() for r in caplog.records)


def test_plain_model_passes_through_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(3, 8)
    gm, inputs = capture_graph(model, x)
    code = gm.code
    assert dsv4_xpu(gm, inputs, {"inductor": False}) is gm
    assert gm.code == code
    assert dsv4_compile.last_report().total_changed == 0
    compiled = torch.compile(model, backend="dsv4_xpu")
    torch.testing.assert_close(compiled(x), model(x))


@needs_trace_time_retarget
def test_disabled_pass_makes_the_audit_fail_with_the_source_line():
    block, x = block_and_input()
    with dsv4_compile.cuda_compat("cpu"), pytest.raises(Exception) as info:
        torch.compile(block, backend="dsv4_xpu", options={"disable": ["activation"]})(x)
    assert "_C::silu_and_mul_with_clamp has a native lowering that was not applied" in str(info.value)
    assert "blocks.py" in str(info.value)


@needs_trace_time_retarget
def test_inductor_false_runs_the_rewritten_graph_eagerly():
    block, x = block_and_input()
    compiled = dsv4_compile.compile(block, inductor=False)
    torch.testing.assert_close(compiled(x), native_block(block, x), rtol=1e-5, atol=1e-5)
    assert dsv4_compile.last_report()["activation"].changed == 1
