"""Random programs of vLLM's real ops through dsv4_xpu, against the same programs run eagerly on CPU kernels.

A program is a chain of steps over `(x [T, H], streams [T, m, H])`: vLLM's mHC ops (`vllm::mhc_pre_tilelang`,
`mhc_post_tilelang`, `hc_head_fused_kernel_tilelang`, their CPU kernels registered by vLLM on a CPU platform),
the clamped SwiGLU (`_C::silu_and_mul_with_clamp`, writing a fresh buffer or the caller's `x`), and plain torch
between them. Each program is drawn with: where the steps run (top level, both branches of `torch.cond`, a
`nested_compile_region` (invoke_subgraph), activation checkpointing), whether `x` is a view of stream 0 (inputs
aliasing one storage), bf16 or fp32, two token counts run through one compile (dynamic sizes), with Inductor or
without. The oracle is the program run eagerly: vLLM's CPU kernels for its ops, the fp64 formula of
tests/lowerings/test_activation.py for the SwiGLU (no CPU kernel of it exists). A program that also calls an op
with only a CUDA kernel and no lowering must fail the strict audit, naming it.

`make fuzz` runs DSV4_FUZZ_PROGRAMS programs (10,000 by default; hours on 2 cores); `make test` runs 25.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsv4_compile
from dsv4_compile.errors import CudaOnlyNodesError
from tests.lowerings.test_activation import formula as swiglu64

M, H = 4, 32
STEPS = ("pre", "post", "head", "swiglu", "swiglu_into_x", "torch")
BF16_ONLY = {"pre", "head"}  # vLLM's CPU kernels of these take bf16 streams
WRAPPERS = ("none", "cond", "invoke_subgraph", "checkpoint")
PROGRAMS = int(os.environ.get("DSV4_FUZZ_PROGRAMS", "25"))

_lib = torch.library.Library("dsv4_fuzz", "DEF")
_lib.define("cuda_only(Tensor x) -> Tensor")
_lib.impl("cuda_only", lambda x: x.clone(), "CUDA")
torch.library.register_fake("dsv4_fuzz::cuda_only", lambda x: torch.empty_like(x), lib=_lib)


@dataclasses.dataclass(frozen=True)
class Case:
    steps: tuple[str, ...]
    wrapper: str
    dtype: torch.dtype
    tokens: tuple[int, int]
    alias: bool
    inductor: bool
    cuda_only_at: int | None
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    allowed = [s for s in STEPS if dtype == torch.bfloat16 or s not in BF16_ONLY]
    wrapper = draw(st.sampled_from(WRAPPERS))
    if wrapper != "none":  # higher-order ops' subgraphs may not write their inputs
        allowed.remove("swiglu_into_x")
    steps = tuple(draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=6)))
    cuda_only = draw(st.one_of(st.none(), st.integers(0, len(steps))))
    # torch's cond and invoke_subgraph refuse operands that alias each other, whatever the backend
    alias = wrapper in ("none", "checkpoint") and draw(st.booleans())
    return Case(steps, wrapper, dtype, (draw(st.integers(2, 9)), draw(st.integers(2, 9))), alias,
                draw(st.integers(0, 49)) == 0, cuda_only if draw(st.integers(0, 9)) == 0 else None,
                draw(st.integers(0, 2**16)))


def parameters(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mixes = M * (M + 2)
    return dict(fn=torch.randn(mixes, M * H, generator=gen) / (M * H) ** 0.5, scale=0.5 + torch.rand(3, generator=gen),
                base=0.5 * torch.randn(mixes, generator=gen), head_fn=torch.randn(M, M * H, generator=gen) / H,
                head_scale=0.5 + torch.rand(1, generator=gen), head_base=0.3 * torch.randn(M, generator=gen),
                norm=(1 + 0.3 * torch.randn(H, generator=gen)).bfloat16())


PRE_ARGS = (1e-6, 1e-6, 1e-6, 2.0, 3)  # rms_eps, pre_eps, sinkhorn_eps, post multiplier, Sinkhorn rounds
HEAD_EPS = (1e-6, 1e-6)  # rms_eps, hc_eps
NORM_EPS = 1e-6


class CompiledOps:
    """The ops as the program calls them: what dsv4_xpu sees and lowers. The constants are written out: with
    dynamic=True, Dynamo (torch 2.13) traces floats read from a module-level tuple as symbolic and then fails
    to lift them into a torch.cond branch ("lift_tracked_freevar_to_input should not be called on root
    SubgraphTracer"), whatever the backend; found by this fuzzer."""

    @staticmethod
    def pre(streams, p):
        return torch.ops.vllm.mhc_pre_tilelang(streams, p["fn"], p["scale"], p["base"], 1e-6, 1e-6, 1e-6, 2.0, 3, 1,
                                               p["norm"], 1e-6)

    @staticmethod
    def post(x, streams, post, comb):
        return torch.ops.vllm.mhc_post_tilelang(x, streams, post, comb)

    @staticmethod
    def head(streams, p):
        return torch.ops.vllm.hc_head_fused_kernel_tilelang(streams, p["head_fn"], p["head_scale"], p["head_base"],
                                                            1e-6, 1e-6)

    @staticmethod
    def swiglu(out, x, limit):
        torch.ops._C.silu_and_mul_with_clamp(out, x, limit)


def vllm_reference():
    """vllm/model_executor/kernels/mhc/torch.py (the package re-exports a `torch` name that shadows it)."""
    return importlib.import_module("vllm.model_executor.kernels.mhc.torch")


class EagerOracle:
    """The same ops, eagerly: vLLM's torch references (kernels/mhc/torch.py, vllm.ir's rms_norm) where vLLM has
    them, the fp64 formulas where it has none that runs on this CPU (the head, the SwiGLU)."""

    @staticmethod
    def pre(streams, p):
        from vllm import ir

        post, comb, layer_input = vllm_reference().mhc_pre_torch(streams, p["fn"], p["scale"], p["base"], *PRE_ARGS)
        return post, comb, ir.ops.rms_norm(layer_input, p["norm"], NORM_EPS)

    @staticmethod
    def post(x, streams, post, comb):
        return vllm_reference().mhc_post_torch(x, streams, post, comb)

    @staticmethod
    def head(streams, p):
        flat = streams.flatten(-2).double()
        logits = flat @ p["head_fn"].double().T / torch.sqrt(flat.square().mean(-1, keepdim=True) + HEAD_EPS[0])
        gates = torch.sigmoid(logits * p["head_scale"].double() + p["head_base"].double()) + HEAD_EPS[1]
        return (gates[..., None] * streams.double()).sum(-2).to(streams.dtype)

    @staticmethod
    def swiglu(out, x, limit):
        out.copy_(swiglu64(x, limit, rounded_to=x.dtype))


def body(case: Case, p: dict[str, torch.Tensor], ops, x: torch.Tensor, streams: torch.Tensor, flip: float):
    """The program's steps; `flip` tells cond's branches apart. Returns the new (x, streams)."""
    post = (torch.sigmoid(x[:, :M].float()) * 2).unsqueeze(-1)
    comb = torch.softmax(x[:, :M * M].float().reshape(-1, M, M), -1)
    for index, step in enumerate(case.steps):
        if case.cuda_only_at == index:
            x = torch.ops.dsv4_fuzz.cuda_only(x)
        if step == "pre":
            post, comb, x = ops.pre(streams, p)
        elif step == "post":
            streams = ops.post(x, streams, post, comb)
        elif step == "head":
            x = ops.head(streams, p)
        elif step == "swiglu":
            out = torch.empty_like(x)
            ops.swiglu(out, torch.cat([x, streams[:, 1] * flip], -1), 6.0)  # a literal: see CompiledOps
            x = out
        elif step == "swiglu_into_x":  # the caller's buffer: with `alias`, stream 0 is written too
            ops.swiglu(x, torch.cat([streams[:, 1], x * flip], -1), 6.0)
        else:
            x = (x * flip + streams.mean(1)).to(x.dtype)
    if case.cuda_only_at == len(case.steps):
        x = torch.ops.dsv4_fuzz.cuda_only(x)
    return x, streams


def program(case: Case, ops, eager: bool = False):
    """`run(x, streams, params)`; the parameters are an argument (graph inputs), as a module's would be. `eager`:
    the higher-order op's meaning in plain Python (torch.cond, run eagerly, would compile its branches)."""

    def run(x: torch.Tensor, streams: torch.Tensor, p: dict[str, torch.Tensor]):
        names = sorted(p)  # the parameters are operands of the higher-order ops too

        def branch(flip: float):
            def steps(x: torch.Tensor, s: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x, s = body(case, dict(zip(names, values, strict=True)), ops, x, s, flip)
                return x.clone(), s.clone()  # a subgraph may not return its operands as they are (torch)

            return steps

        operands = (x, streams, *(p[name] for name in names))
        if case.wrapper == "cond":
            take_first = x.float().sum() > 0
            if eager:
                return branch(1.0 if take_first else -0.5)(*operands)
            return torch.cond(take_first, branch(1.0), branch(-0.5), operands)
        if case.wrapper == "invoke_subgraph" and not eager:
            return torch.compiler.nested_compile_region(branch(1.0))(*operands)
        if case.wrapper == "checkpoint" and not eager:
            return torch.utils.checkpoint.checkpoint(branch(1.0), *operands, use_reentrant=False)
        return branch(1.0)(*operands)

    return run


def inputs(case: Case, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed + tokens)
    streams = torch.randn(tokens, M, H, generator=gen).to(case.dtype)
    x = streams[:, 0] if case.alias else torch.randn(tokens, H, generator=gen).to(case.dtype)
    return x, streams


def close(actual: torch.Tensor, expected: torch.Tensor, case: Case, what: str) -> None:
    # A bf16 value may sit one rounding away after each step, and the mixing steps carry that on.
    tol = 1e-4 if case.dtype == torch.float32 else 2 ** -7 * (1 + len(case.steps))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def check_program(case: Case) -> None:
    p = parameters(case.seed)
    torch._dynamo.reset()
    options = {"inductor": case.inductor, "strict": True}
    with dsv4_compile.cuda_compat("cpu"):
        compiled = torch.compile(program(case, CompiledOps), backend="dsv4_xpu", options=options, dynamic=True)
        if case.cuda_only_at is not None:
            with pytest.raises(Exception, match=r"dsv4_fuzz(\.|::)cuda_only") as raised:
                compiled(*inputs(case, case.tokens[0]), p)
            assert isinstance(raised.value, CudaOnlyNodesError) or "CudaOnlyNodesError" in str(raised.value)
            return
        for tokens in case.tokens:
            x, streams = inputs(case, tokens)
            x_ref, streams_ref = (t.clone() for t in (x, streams))
            if case.alias:
                x_ref = streams_ref[:, 0]
            got = compiled(x, streams, p)
            expected = program(case, EagerOracle, eager=True)(x_ref, streams_ref, p)
            for name, a, e in (("x", got[0], expected[0]), ("streams", got[1], expected[1]),
                               ("input x after", x, x_ref), ("input streams after", streams, streams_ref)):
                close(a, e, case, f"{name} of {case}")


@settings(max_examples=PROGRAMS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_random_programs_of_vllm_ops_match_eager(case: Case) -> None:
    check_program(case)
