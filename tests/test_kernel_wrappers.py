"""Trace-time substitution of kernel wrappers (frontend/kernel_wrappers.py): a Python entry point that cannot
run off CUDA is swapped, wherever it is bound, for a call of a registered op; the swap holds inside the block
only, and the compiled graph holds the op, which the backend lowers."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import dsv4_compile
from dsv4_compile.frontend.kernel_wrappers import bindings_of, substituted_wrappers, vllm_kernel_wrappers

# `dsv4_wrapop::halve(x) = x / 2`, CUDA kernel only, lowered natively.
_lib = torch.library.Library("dsv4_wrapop", "DEF")
_lib.define("halve(Tensor x) -> Tensor")
_lib.impl("halve", lambda x: x / 2, "CUDA")
torch.library.register_fake("dsv4_wrapop::halve", lambda x: torch.empty_like(x), lib=_lib)


@dsv4_compile.native_lowering("dsv4_wrapop::halve", family="wrapop")
def halve_native(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def cuda_only_wrapper(x: torch.Tensor) -> torch.Tensor:
    raise ImportError("a CUDA-only kernel library is required")


def as_op(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsv4_wrapop.halve(x)


@pytest.fixture
def fake_package():
    """`fakekern.kernels` defines the wrapper; `fakekern.model` imported it by name (and the same object under
    another name, as vLLM's CPU build binds one raising function to every FlashMLA entry point); `other`, a
    module of another package, imported it too."""
    kernels, model, other = (types.ModuleType(n) for n in ("fakekern.kernels", "fakekern.model", "otherpkg"))
    kernels.halve_kernel = cuda_only_wrapper
    model.halve_kernel = cuda_only_wrapper
    model.alias = cuda_only_wrapper
    other.halve_kernel = cuda_only_wrapper
    exec("def forward(x):\n    return halve_kernel(x) + 1\n", model.__dict__)
    modules = {"fakekern": types.ModuleType("fakekern"), "fakekern.kernels": kernels, "fakekern.model": model,
               "otherpkg": other}
    sys.modules.update(modules)
    yield kernels, model, other
    for name in modules:
        sys.modules.pop(name, None)


TABLE = {"fakekern.kernels.halve_kernel": as_op}


def test_every_binding_in_the_package_is_swapped_and_restored(fake_package):
    kernels, model, other = fake_package
    assert bindings_of(cuda_only_wrapper, "halve_kernel", "fakekern") == [kernels, model]
    with substituted_wrappers(TABLE) as swapped:
        assert swapped == ["fakekern.kernels.halve_kernel"]
        assert kernels.halve_kernel is as_op and model.halve_kernel is as_op
        assert model.alias is cuda_only_wrapper  # the same object under another name is another entry point
        assert other.halve_kernel is cuda_only_wrapper  # another package is not touched
    assert kernels.halve_kernel is cuda_only_wrapper and model.halve_kernel is cuda_only_wrapper
    assert model.alias is cuda_only_wrapper


def test_bindings_are_restored_when_the_block_raises(fake_package):
    kernels, model, _ = fake_package
    with pytest.raises(RuntimeError, match="boom"), substituted_wrappers(TABLE):
        raise RuntimeError("boom")
    assert kernels.halve_kernel is cuda_only_wrapper and model.halve_kernel is cuda_only_wrapper


def test_a_module_loaded_after_an_entry_is_swapped_on_the_next(fake_package):
    """The scan of the package's modules is remembered between entries, and redone once a module is loaded."""
    with substituted_wrappers(TABLE):
        pass
    late = types.ModuleType("fakekern.late")
    late.halve_kernel = cuda_only_wrapper
    sys.modules["fakekern.late"] = late
    try:
        with substituted_wrappers(TABLE):
            assert late.halve_kernel is as_op
        assert late.halve_kernel is cuda_only_wrapper
    finally:
        sys.modules.pop("fakekern.late")


def test_a_wrapper_whose_module_is_not_loaded_is_left_alone():
    with substituted_wrappers({"not_loaded_pkg.mod.fn": as_op}) as swapped:
        assert swapped == []


def test_the_traced_graph_holds_the_op_and_the_backend_lowers_it(fake_package):
    _, model, _ = fake_package
    x = torch.arange(6.0)
    with pytest.raises(ImportError):
        model.forward(x)
    compiled = torch.compile(model.forward, backend="dsv4_xpu", fullgraph=True)
    with substituted_wrappers(TABLE):
        got = compiled(x)
    torch.testing.assert_close(got, x / 2 + 1)
    report = dsv4_compile.last_report()
    assert report["wrapop"].changed == 1 and report["audit"].matched == 0


def test_without_vllm_loaded_nothing_is_substituted(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with vllm_kernel_wrappers() as swapped:
        assert swapped == []
