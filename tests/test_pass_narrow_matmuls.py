"""Pass `narrow_matmuls`: fp32 matmuls of widened bf16/fp16 values become narrow matmuls with an fp32 result.

The CPU build of torch has no `aten::mm.dtype` / `bmm.dtype` kernel, so here the pass is run for a target said to
have one, and the rewritten graph is run with a test-only CPU kernel of those overloads written in fp64; the real
kernels are checked against fp64 on the GPU (tests/test_gpu_narrow_matmuls.py).
"""

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from dsv4_compile.lowering.passes import narrow_matmuls
from dsv4_compile.lowering.passes.narrow_matmuls import narrow_widened_matmuls
from tests.conftest import op_counts

aten = torch.ops.aten


@pytest.fixture
def target_has_narrow_matmuls(monkeypatch):
    """The target has the narrow overloads; on CPU they run as fp64 math rounded to fp32 (a test-only kernel)."""
    monkeypatch.setattr(narrow_matmuls, "has_kernel_for", lambda op, device: True)
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm.dtype", lambda a, b, out_dtype: (a.double() @ b.double()).to(out_dtype), "CPU")
    lib.impl("bmm.dtype", lambda a, b, out_dtype: (a.double() @ b.double()).to(out_dtype), "CPU")
    yield
    lib._destroy()


def attention_scores(q, keys, x, w):
    scores = torch.einsum("thd,kd->thk", q.float(), keys.float())
    projected = x.float() @ w.float().T
    return scores, projected


def aten_graph(fn, *args):
    return make_fx(fn, decomposition_table=select_decomp_table())(*args)


def args(dtype):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen).to(dtype) for shape in ((5, 3, 16), (7, 16), (5, 32), (6, 32)))


def matmuls(gm):
    return {op: n for op, n in op_counts(gm).items() if op in ("aten::mm", "aten::bmm")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_matmuls_become_narrow_and_give_the_fp64_products_rounded(target_has_narrow_matmuls, dtype):
    inputs = args(dtype)
    gm = aten_graph(attention_scores, *inputs)
    before = matmuls(gm)
    assert narrow_widened_matmuls(gm.graph, "cuda") == sum(before.values()) >= 2
    gm.recompile()
    assert not any(n.target in (aten.mm.default, aten.bmm.default) for n in gm.graph.nodes)
    narrow = [n for n in gm.graph.nodes if n.target in (aten.mm.dtype, aten.bmm.dtype)]
    assert {n.args[0].meta["val"].dtype for n in narrow} == {n.args[1].meta["val"].dtype for n in narrow} == {dtype}
    assert all(n.meta["val"].dtype == torch.float32 for n in narrow)
    q, keys, x, w = inputs
    scores, projected = gm(*inputs)
    torch.testing.assert_close(scores, torch.einsum("thd,kd->thk", q.double(), keys.double()).float(), rtol=0, atol=0)
    torch.testing.assert_close(projected, (x.double() @ w.double().T).float(), rtol=0, atol=0)
    assert narrow_widened_matmuls(gm.graph, "cuda") == 0  # idempotent


def test_fp32_operands_mixed_dtypes_and_targets_without_the_kernel_are_left(target_has_narrow_matmuls, monkeypatch):
    def mixed(a, b, c):
        return a.float() @ b, a.float() @ c.float()

    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 3)
    gm = aten_graph(mixed, a, b, torch.randn(8, 3, dtype=torch.float16))
    assert narrow_widened_matmuls(gm.graph, "cuda") == 0  # a real fp32 operand; bf16 with fp16
    monkeypatch.setattr(narrow_matmuls, "has_kernel_for", lambda op, device: False)
    gm = aten_graph(attention_scores, *args(torch.bfloat16))
    assert narrow_widened_matmuls(gm.graph, "xpu") == 0


def test_the_backend_installs_the_pass_for_its_target():
    from dsv4_compile.lowering.backend import inductor_config_patches
    from dsv4_compile.lowering.options import BackendOptions

    patch = inductor_config_patches(BackendOptions(), "cuda")["post_grad_custom_pre_pass"]
    assert isinstance(patch, narrow_matmuls.NarrowWidenedMatmuls) and patch.device_type == "cuda"
    assert patch.uuid() != inductor_config_patches(BackendOptions(), "xpu")["post_grad_custom_pre_pass"].uuid()
