"""codegen where Triton is installed but there is no GPU: the CUDA-oriented model's capture must take its
plain-torch launcher path (Dynamo cannot trace a user Triton kernel without a Triton-capable device), and the
kernels Inductor writes then follow the installed Triton's conventions and compile with it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._triton import has_triton, has_triton_package

from dsv4_compile import capture
from dsv4_compile.models.deepseek_v4 import triton_kernels
from dsv4_compile.tools.cli import main

pytestmark = [
    pytest.mark.skipif(not has_triton_package(), reason="needs the triton package (torch 2.13 pins triton==3.7.1): "
                       "this file covers codegen on a machine with Triton installed and no GPU"),
    pytest.mark.skipif(torch.cuda.is_available() or torch.xpu.is_available(),
                       reason="covers machines without a GPU; with one, the model launches its Triton kernels"),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`dsv4-compile codegen --config tiny` output for a device, run once per module."""
    outs: dict[str, Path] = {}

    def run(device: str) -> Path:
        if device not in outs:
            out = tmp_path_factory.mktemp(f"codegen_{device}")
            assert main(["codegen", "--device", device, "--config", "tiny", "--out", str(out)]) == 0
            outs[device] = out
        return outs[device]

    return run


def _launchers(x, cos, sin, kv, score):
    return triton_kernels.inv_rope(x, cos, sin), *triton_kernels.save_partial_states(kv, score)


def test_launchers_trace_the_torch_path_on_fake_cuda():
    assert triton_kernels.HAS_TRITON
    assert not triton_kernels.pdl_supported(torch.device("cuda", 0))
    inputs = (torch.randn(3, 2, 8), torch.randn(3, 2), torch.randn(3, 2), torch.randn(4, 6), torch.randn(4, 6))
    gm = capture(_launchers, *inputs)
    assert "triton_kernel_wrapper" not in gm.code and "get_device_capability" not in gm.code
    assert {str(n.meta["example_value"].device) for n in gm.graph.nodes if n.op == "placeholder"} == {"cuda:0"}


@pytest.mark.parametrize("device", ["xpu", "cuda"])
def test_cli_codegen(device, generated):
    out = generated(device)
    wrapper = (out / "wrapper.py").read_text()
    assert f"device_str='{device}'" in wrapper and f"empty_strided_{device}(" in wrapper
    kernels = list((out / "kernels").glob("*.py"))
    assert kernels and all("@triton.jit" in k.read_text() for k in kernels)
    assert "AttrsDescriptor" not in wrapper  # the older convention Inductor uses only when Triton is missing
    assert "triton_kernel_wrapper" not in (out / "graph.py").read_text()
    assert not has_triton()  # Dynamo's view of this machine is as it was


def test_cuda_kernels_compile_with_the_installed_triton(generated, monkeypatch, tmp_path):
    """One kernel per Inductor heuristic (pointwise, reduction, persistent reduction), its first config,
    compiled by Triton for sm_90 down to a cubin: what Inductor's precompile does, minus the launch."""
    import triton
    from torch._inductor.runtime import triton_helpers
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setattr(triton_helpers, "set_driver_to_gpu", lambda: None)  # the modules ask for an active GPU
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from an earlier run's cache
    paths = sorted((generated("cuda") / "kernels").glob("*.py"))
    chosen = [next(p for p in paths if p.name.startswith(prefix)) for prefix in ("triton_poi", "triton_per")]
    chosen += [p for p in paths if p.name.startswith("triton_red")][:1]
    for path in chosen:
        spec = importlib.util.spec_from_file_location(f"dsv4_generated_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tuner = getattr(module, path.stem)
        config = tuner.configs[0]
        meta = tuner._create_compile_meta(config)
        source = ASTSource(tuner.fn, meta["signature"], meta["constants"], meta["configs"][0])
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=tuner._create_compile_options(config, meta))
        assert binary.asm["cubin"] and ".target sm_90" in binary.asm["ptx"], path.name
