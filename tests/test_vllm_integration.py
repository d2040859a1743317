"""vLLM integration: the backend strings vLLM resolves (modes 1/2) and the post-grad pass (mode 3).

The mode-3 tests go through Inductor's real `post_grad_custom_post_pass` hook on CPU. The tests that build a
real `vllm.config.CompilationConfig` skip where vLLM is not importable (see docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
from torch._inductor import config as inductor_config
from torch._inductor.utils import fresh_cache, run_and_get_code

import dsv4_compile
from dsv4_compile.integrations import vllm as integration
from dsv4_compile.integrations.vllm import Dsv4PostGradPass, dsv4_post_grad_pass
from dsv4_compile.lowering.registry import LOWERINGS, native_lowering, triton_fallback
from dsv4_compile.models.deepseek_v4.cuda_ops import cpu_reference_kernels
from dsv4_compile.models.deepseek_v4.oracle import _silu_and_mul_with_clamp as oracle_activation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_inductor_cache(tmp_path, monkeypatch):
    """Each test compiles from scratch: a cache hit would skip the post-grad pass under test."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "inductor").mkdir()
    with fresh_cache(dir=str(tmp_path / "inductor")):
        yield


def _silu_fresh(x):
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops._C.silu_and_mul_with_clamp(out, x, 7.0)
    return out * 2


def _silu_into(x, out):
    torch.ops._C.silu_and_mul_with_clamp(out, x, 7.0, 1.702, 1.0)
    return out + 1


def _silu_into_view(x, big):
    torch.ops._C.silu_and_mul_with_clamp(big[:, 2:6], x, 7.0, 1.702, 1.0)
    return big.sum(0)


def _x() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 10  # beyond the clamp limit


# --- modes 1/2: backend strings --------------------------------------------------------------------------


def _resolve_like_vllm(backend: str) -> object:
    """What vLLM's CompilationConfig.init_backend does for modes 1/2: a registered torch backend name goes
    to torch.compile as is, anything else is imported as "module.attr"."""
    if backend in torch._dynamo.list_backends(exclude_tags=()):
        return backend
    module, _, attr = backend.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_registered_name_is_passed_through_and_compiles():
    resolved = _resolve_like_vllm(integration.BACKEND_NAME)
    assert resolved == "dsv4_xpu"
    assert torch._dynamo.lookup_backend(resolved) is dsv4_compile.dsv4_xpu
    x = _x()
    torch.testing.assert_close(torch.compile(_silu_fresh, backend=resolved)(x),
                               oracle_activation(x, 7.0) * 2)
    assert dsv4_compile.last_report()["activation"].changed == 1


def test_qualified_name_is_imported_and_compiles():
    assert integration.BACKEND_QUALNAME not in torch._dynamo.list_backends(exclude_tags=())
    resolved = _resolve_like_vllm(integration.BACKEND_QUALNAME)
    assert resolved is dsv4_compile.dsv4_xpu
    x, out = _x(), torch.zeros(4, 4)
    torch.testing.assert_close(torch.compile(_silu_into, backend=resolved)(x, out),
                               oracle_activation(x, 7.0, 1.702, 1.0) + 1)
    torch.testing.assert_close(out, oracle_activation(x, 7.0, 1.702, 1.0))


# --- mode 3: the post-grad pass through Inductor's hook --------------------------------------------------


@pytest.mark.parametrize("v2", [True, False], ids=["auto_functionalized_v2", "auto_functionalized"])
@pytest.mark.parametrize("fn", [_silu_fresh, _silu_into, _silu_into_view], ids=["fresh", "caller_buffer", "view"])
def test_post_grad_pass_lowers_the_op_through_inductor(fn, v2):
    x = _x()
    args = {_silu_fresh: (x,), _silu_into: (x, torch.zeros(4, 4)), _silu_into_view: (x, torch.zeros(4, 9))}[fn]
    eager_args = [a.clone() for a in args]
    with cpu_reference_kernels():  # eager: the op on a CPU kernel made of the model oracle's math
        expected = fn(*eager_args)
    pass_ = Dsv4PostGradPass()
    with inductor_config.patch(post_grad_custom_post_pass=pass_, enable_auto_functionalized_v2=v2):
        result, (code, *_) = run_and_get_code(torch.compile(fn, backend="inductor"), *args)
    torch.testing.assert_close(result, expected)
    for got, want in zip(args, eager_args):  # the caller's buffer is filled like the kernel fills it
        torch.testing.assert_close(got, want)
    assert (pass_.last_result["registered_ops"].matched, pass_.last_result["registered_ops"].changed) == (1, 1)
    assert "silu_and_mul_with_clamp" not in code  # Inductor's own kernel, not a call of the op


def test_uuid_is_stable_and_follows_options_and_registry():
    assert Dsv4PostGradPass().uuid() == dsv4_post_grad_pass.uuid() == Dsv4PostGradPass().uuid()
    assert Dsv4PostGradPass(pdl=False).uuid() != dsv4_post_grad_pass.uuid()
    assert Dsv4PostGradPass(ops=("_C::silu_and_mul_with_clamp",)).uuid() != dsv4_post_grad_pass.uuid()
    before = dsv4_post_grad_pass.uuid()
    with _scaled_pair_op():
        assert dsv4_post_grad_pass.uuid() != before  # a newly registered lowering is part of the key
    assert dsv4_post_grad_pass.uuid() == before


def test_fx_graph_cache_hits_with_the_same_pass_and_misses_with_other_options():
    x = _x()
    expected = oracle_activation(x, 7.0) * 2

    def compile_once(pass_: Dsv4PostGradPass) -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        with inductor_config.patch(post_grad_custom_post_pass=pass_):
            torch.testing.assert_close(torch.compile(_silu_fresh, backend="inductor")(x), expected)
        stats = counters["inductor"]
        assert stats["fxgraph_cache_bypass"] == 0
        return stats["fxgraph_cache_hit"], stats["fxgraph_cache_miss"]

    with inductor_config.patch(fx_graph_cache=True):
        assert compile_once(Dsv4PostGradPass()) == (0, 1)
        assert compile_once(Dsv4PostGradPass()) == (1, 0)  # same uuid: served from the cache, still correct
        assert compile_once(Dsv4PostGradPass(pdl=False)) == (0, 1)  # other options: other key


# --- mode 3: functional ops with tuple outputs, and Triton launches ----------------------------------------

_lib = torch.library.Library("dsv4_test", "FRAGMENT")
_lib.define("scaled_pair(Tensor x, float scale) -> (Tensor, Tensor)")


def _scaled_pair_cuda_only(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("stands in for a CUDA-only kernel: the post-grad pass should have replaced this call")


_lib.impl("scaled_pair", _scaled_pair_cuda_only, "CPU")
torch.library.register_fake("dsv4_test::scaled_pair", lambda x, scale: (torch.empty_like(x), torch.empty_like(x)),
                            lib=_lib)


def _scaled_pair_native(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x * scale).clamp(min=-1.0, max=1.0), x - scale


@contextlib.contextmanager
def _scaled_pair_op() -> Iterator[None]:
    """Registers the native lowering of dsv4_test::scaled_pair while in use (LOWERINGS is global)."""
    native_lowering("dsv4_test::scaled_pair")(_scaled_pair_native)
    try:
        yield
    finally:
        LOWERINGS.pop("dsv4_test::scaled_pair", None)


def test_functional_op_with_tuple_output_is_inlined():
    def fn(x):
        a, b = torch.ops.dsv4_test.scaled_pair(x, 0.5)
        return a + b

    x = _x()
    pass_ = Dsv4PostGradPass()
    with _scaled_pair_op(), inductor_config.patch(post_grad_custom_post_pass=pass_):
        result = torch.compile(fn, backend="inductor")(x)
    a, b = _scaled_pair_native(x, 0.5)
    torch.testing.assert_close(result, a + b)
    assert pass_.last_result["registered_ops"].changed == 1


def _pg_double_into_kernel(x_ptr, out_ptr, n, BLOCK, USE_GDC):
    """Stands in for a @triton.jit kernel: the pass only needs its name."""


@triton_fallback("_pg_double_into_kernel")
def _pg_double_into_fallback(x_ptr, out_ptr, n, BLOCK):
    out_ptr.copy_(x_ptr * 2)


def _functional_launch_graph(x: torch.Tensor, out: torch.Tensor) -> torch.fx.GraphModule:
    """What post-grad holds for `kernel[grid](x, out, n, BLOCK=64, USE_GDC=True, launch_pdl=True)`."""
    graph = torch.fx.Graph()
    x_node, out_node = graph.placeholder("x"), graph.placeholder("out")
    x_node.meta["val"], out_node.meta["val"] = x, out
    constants = {"n": 4, "BLOCK": 64, "USE_GDC": True, "launch_pdl": True}
    launch = graph.call_function(
        triton_kernel_wrapper_functional,
        kwargs={"kernel_idx": kernel_side_table.add_kernel(_pg_double_into_kernel),
                "constant_args_idx": kernel_side_table.add_constant_args(constants),
                "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x_ptr": x_node, "out_ptr": out_node},
                "tensors_to_clone": ["out_ptr"]},
    )
    new_out = graph.call_function(operator.getitem, (launch, "out_ptr"))
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (new_out, 1)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_functional_triton_launch_on_cpu_becomes_its_fallback():
    x, out = torch.arange(4.0), torch.zeros(4)
    gm = _functional_launch_graph(x, out)
    pass_ = Dsv4PostGradPass()
    pass_(gm.graph)
    gm.recompile()
    assert not any(n.target is triton_kernel_wrapper_functional for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, out), x * 2 + 1)
    torch.testing.assert_close(out, torch.zeros(4))  # functional: the input is not written
    assert pass_.last_result["triton_launches"].changed == 1


def test_functional_triton_launch_on_triton_target_keeps_the_kernel_without_pdl():
    with torch._subclasses.FakeTensorMode():
        x, out = torch.empty(4, device="cuda"), torch.empty(4, device="cuda")
    gm = _functional_launch_graph(x, out)
    Dsv4PostGradPass()(gm.graph)
    (launch,) = [n for n in gm.graph.nodes if n.target is triton_kernel_wrapper_functional]
    constants = kernel_side_table.get_constant_args(launch.kwargs["constant_args_idx"])
    assert "launch_pdl" not in constants and constants["USE_GDC"] is False and constants["BLOCK"] == 64


def test_pdl_option_off_leaves_launches():
    x, out = torch.arange(4.0), torch.zeros(4)
    gm = _functional_launch_graph(x, out)
    Dsv4PostGradPass(pdl=False)(gm.graph)
    assert any(n.target is triton_kernel_wrapper_functional for n in gm.graph.nodes)


# --- the example, and a real vLLM CompilationConfig -----------------------------------------------------


def test_example_prints_both_forms(capsys):
    runpy.run_path(str(ROOT / "examples" / "vllm_config.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert integration.BACKEND_NAME in printed and integration.BACKEND_QUALNAME in printed
    assert integration.POST_GRAD_PASS_QUALNAME in printed


def _vllm_config_module():
    try:
        return importlib.import_module("vllm.config")
    except Exception as exc:  # not installed, or its import needs what this machine lacks
        pytest.skip(f"vllm.config is not importable here ({type(exc).__name__}: {exc}); see docs/vllm.md")


@pytest.mark.parametrize("backend", [integration.BACKEND_NAME, integration.BACKEND_QUALNAME])
@pytest.mark.parametrize("mode", [1, 2])
def test_real_vllm_config_resolves_the_backend(mode, backend):
    vllm_config = _vllm_config_module()
    config = vllm_config.CompilationConfig(mode=mode, backend=backend)
    resolved = config.init_backend(None)  # modes 1/2 do not read the VllmConfig
    expected = "dsv4_xpu" if backend == integration.BACKEND_NAME else dsv4_compile.dsv4_xpu
    assert resolved == expected


def test_real_vllm_config_takes_the_pass_object_with_its_uuid():
    vllm_config = _vllm_config_module()
    assert integration.register_with_vllm()
    # `inductor_passes` takes strings only (pydantic); a Python object goes in inductor_compile_config, where
    # vLLM's pass manager asserts isinstance(pass, InductorPass): what register_with_vllm makes true.
    config = vllm_config.CompilationConfig(
        mode=3, inductor_compile_config={"post_grad_custom_post_pass": dsv4_post_grad_pass})
    inductor_pass = importlib.import_module("vllm.compilation.passes.inductor_pass")
    assert isinstance(dsv4_post_grad_pass, inductor_pass.InductorPass)
    assert config.inductor_compile_config["post_grad_custom_post_pass"] is dsv4_post_grad_pass


def test_dotted_pass_name_resolves_the_way_vllm_looks_it_up():
    # vLLM: __import__("a.b.c").__dict__["name"]; __import__ returns the top-level package.
    module, _, name = integration.POST_GRAD_PASS_QUALNAME.rpartition(".")
    assert __import__(module).__dict__[name] is dsv4_post_grad_pass
    assert importlib.import_module(module).__dict__[name] is dsv4_post_grad_pass


def test_real_vllm_config_resolves_the_dotted_pass_name():
    """vLLM's own order: vLLM is loaded, the config string imports dsv4_compile (in a fresh process)."""
    _vllm_config_module()
    script = (
        "from vllm.config import CompilationConfig\n"
        f"config = CompilationConfig(mode=3, inductor_passes={{'post_grad_custom_post_pass': "
        f"{integration.POST_GRAD_PASS_QUALNAME!r}}})\n"
        "import dsv4_compile.integrations.vllm as integration\n"
        "assert config.inductor_compile_config['post_grad_custom_post_pass'] is integration.dsv4_post_grad_pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_real_vllm_pass_manager_runs_the_pass_and_keys_on_its_uuid(monkeypatch):
    vllm_config = _vllm_config_module()
    monkeypatch.setenv("VLLM_TARGET_DEVICE", os.environ.get("VLLM_TARGET_DEVICE", "cpu"))
    try:
        config = vllm_config.VllmConfig(compilation_config=vllm_config.CompilationConfig(mode=3))
        from vllm.compilation.passes.inductor_pass import CallableInductorPass, pass_context
        from vllm.compilation.passes.pass_manager import PostGradPassManager
        from vllm.config.utils import Range
    except Exception as exc:
        pytest.skip(f"vLLM's pass manager is not usable here ({type(exc).__name__}: {exc})")
    assert integration.register_with_vllm()

    def manager(pass_: Dsv4PostGradPass) -> PostGradPassManager:
        with vllm_config.set_current_vllm_config(config):
            pm = PostGradPassManager()
            pm.configure(config)
        pm.add(pass_)  # asserts isinstance(pass_, InductorPass)
        # vLLM's last pass rewrites vllm._C ops of its CUDA build, absent here.
        pm.fix_functionalization = CallableInductorPass(lambda graph: None, uuid="skipped")
        return pm

    pass_, x = Dsv4PostGradPass(), _x()
    with pass_context(Range(start=1, end=8)):
        pm = manager(pass_)
        assert pm.uuid() != manager(Dsv4PostGradPass(pdl=False)).uuid()  # vLLM's key follows our uuid()
        with vllm_config.set_current_vllm_config(config), inductor_config.patch(post_grad_custom_post_pass=pm):
            result = torch.compile(_silu_fresh, backend="inductor")(x)
    torch.testing.assert_close(result, oracle_activation(x, 7.0) * 2)
    assert pass_.last_result["registered_ops"].changed == 1


# --- the lowering's contract check also guards the post-grad path ----------------------------------------


@contextlib.contextmanager
def _permissive_out_op() -> Iterator[None]:
    """An out-style op whose fake checks nothing, so a wrong buffer reaches post-grad; its lowering checks."""
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("dsv4_test_permissive_double(Tensor(a!) out, Tensor x) -> ()")
    torch.library.register_fake("_C::dsv4_test_permissive_double", lambda out, x: None, lib=lib)
    lib.impl("dsv4_test_permissive_double", lambda out, x: out.copy_(x * 2), "CPU")

    def check(out: torch.Tensor, x: torch.Tensor) -> None:
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(x.shape)}")

    native_lowering("_C::dsv4_test_permissive_double", out="out", check=check)(
        lambda x: x * 2)
    try:
        yield
    finally:
        LOWERINGS.pop("_C::dsv4_test_permissive_double", None)
        lib._destroy()


def test_post_grad_pass_rejects_a_buffer_the_kernel_would_reject():
    def fill(x, out):
        torch.ops._C.dsv4_test_permissive_double(out, x)
        return out

    with _permissive_out_op(), inductor_config.patch(post_grad_custom_post_pass=Dsv4PostGradPass()):
        torch.testing.assert_close(torch.compile(fill, backend="inductor")(torch.ones(3), torch.zeros(3)),
                                   torch.full((3,), 2.0))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"out has shape \(2, 3\), expected \(3,\)"):
            torch.compile(fill, backend="inductor")(torch.ones(3), torch.zeros(2, 3))
