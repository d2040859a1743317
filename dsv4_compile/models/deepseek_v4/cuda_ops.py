"""CUDA-only custom ops of the CUDA-oriented DeepSeek-V4 forward (namespace ``dsv4_cuda``).

Each op has a fake impl (so Dynamo traces it anywhere) and a CUDA impl: composite torch code calling the
oracle math, standing in for the tilelang / FlashMLA kernels (``STAND_IN_KERNELS``, qualname -> function). There
is deliberately NO CPU kernel: on a non-CUDA device these ops run only after the backend rewrites them to
the compiler's own lowerings (dsv4_compile.lowering.lowerings), written separately from this oracle math so
that comparing the two is evidence. For eager tests on CPU, ``cpu_reference_kernels()`` registers
``STAND_IN_KERNELS`` as CPU kernels for the duration of a block.

Sparse decode contract (MQA, one latent is K and V): ``q [B, H, D]``, ``kv [N, D]`` (every sequence's
candidate keys, concatenated), ``indices [B, K]`` int32 rows into ``kv`` (-1 = missing),
``attn_sink [H]`` fp32; ``o[b, h] = sum_j p_j kv[indices[b, j]]`` with
``p = softmax([s_0 .. s_{K-1}, sink_h])[:K]``, ``s_j = scale * q[b, h] . kv[indices[b, j]]`` (-inf where
missing). The tile-scheduler metadata only partitions work; the native math ignores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from dsv4_compile.lowering.lowerings.activation import check_silu_and_mul_buffers

from . import mhc
from .oracle import _silu_and_mul_with_clamp as oracle_silu_and_mul_with_clamp

NAMESPACE = "dsv4_cuda"
MLA_BLOCK = 64  # keys per scheduler block
METADATA_WIDTH = 8  # int32 fields per tile-scheduler row (FlashMLA-like)

SCHEMAS = {
    "mhc_pre": "mhc_pre(Tensor h, Tensor fn, Tensor scale, Tensor base, float rms_eps, float hc_eps, int iters)"
               " -> (Tensor, Tensor, Tensor)",
    "mhc_post": "mhc_post(Tensor x, Tensor h, Tensor post, Tensor comb) -> Tensor",
    "mhc_fused_post_pre": "mhc_fused_post_pre(Tensor x, Tensor h, Tensor post, Tensor comb, Tensor fn, Tensor scale,"
                          " Tensor base, float rms_eps, float hc_eps, int iters) -> (Tensor, Tensor, Tensor, Tensor)",
    "hc_head": "hc_head(Tensor h, Tensor fn, Tensor scale, Tensor base, float rms_eps, float hc_eps) -> Tensor",
    "get_mla_metadata": "get_mla_metadata(Tensor seq_lens, int num_heads, int topk, int num_sm_parts)"
                        " -> (Tensor, Tensor)",
    "sparse_decode": "sparse_decode(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink,"
                     " Tensor? tile_scheduler_metadata, Tensor? num_splits, float scale) -> Tensor",
}


# ----------------------------------------------------------------------------- stand-in CUDA kernels (oracle math)
def mhc_pre_kernel(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, rms_eps: float,
                   hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [T, H], post [T, m], comb [T, m, m])``: the oracle's ``mhc.mhc_pre``."""
    return mhc.mhc_pre(h, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters)


def mhc_post_kernel(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream ``[T, m, H]``: the oracle's ``mhc.mhc_post``."""
    return mhc.mhc_post(x, h, post, comb)


def mhc_fused_post_pre_kernel(
    x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
    scale: torch.Tensor, base: torch.Tensor, rms_eps: float, hc_eps: float, iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h_new, x_next, post_next, comb_next)``: ``mhc_post`` then the next sub-layer's ``mhc_pre``."""
    return mhc.mhc_fused_post_pre(x, h, post, comb, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters)


def hc_head_kernel(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, rms_eps: float,
                   hc_eps: float) -> torch.Tensor:
    """Collapsed stream ``[T, H]``: the oracle's ``mhc.hc_head``."""
    return mhc.hc_head(h, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps)


def get_mla_metadata_kernel(seq_lens: torch.Tensor, num_heads: int, topk: int,
                            num_sm_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic FlashMLA-like tile schedule.

    Sequence b has ``blocks_b = max(1, ceil(min(seq_lens[b], topk) / 64))`` key blocks; the global block
    range is cut into ``num_sm_parts`` equal parts. Returns ``tile_scheduler_metadata [num_sm_parts, 8]``
    int32 rows ``[begin_block, end_block, part, num_heads, 0, 0, 0, 0]`` and ``num_splits [B + 1]`` int32,
    the prefix sum of how many parts each sequence spans.
    """
    lens = seq_lens.to(torch.int64).clamp(max=topk)
    blocks = ((lens + MLA_BLOCK - 1) // MLA_BLOCK).clamp(min=1)
    ends = blocks.cumsum(0)
    total = ends[-1:] if ends.numel() else ends.new_zeros(1)
    per = (total + num_sm_parts - 1) // num_sm_parts
    part = torch.arange(num_sm_parts, device=seq_lens.device, dtype=torch.int64)
    begin, end = torch.minimum(part * per, total), torch.minimum((part + 1) * per, total)
    zeros = torch.zeros_like(part)
    meta = torch.stack([begin, end, part, zeros + num_heads, zeros, zeros, zeros, zeros], dim=1)
    spans = (ends - 1) // per - (ends - blocks) // per + 1
    num_splits = torch.cat([spans.new_zeros(1), spans.cumsum(0)])
    return meta.to(torch.int32), num_splits.to(torch.int32)


def sparse_decode_kernel(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, attn_sink: torch.Tensor,
    tile_scheduler_metadata: torch.Tensor | None, num_splits: torch.Tensor | None, scale: float,
) -> torch.Tensor:
    """Gather + softmax-with-sink (see the module docstring); scheduler arguments are ignored.
    Scores and probabilities in fp32 over ``q.dtype`` operands; output ``[B, H, D]`` in ``q.dtype``."""
    valid = indices >= 0
    keys = kv[indices.clamp(min=0).long()].float()  # [B, K, D]
    s = torch.einsum("bhd,bkd->bhk", q.float(), keys) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    sink = attn_sink.float()[None, :, None].expand(q.shape[0], -1, 1)
    p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
    return torch.einsum("bhk,bkd->bhd", p, keys).to(q.dtype)


STAND_IN_KERNELS: dict[str, Callable[..., object]] = {
    f"{NAMESPACE}::mhc_pre": mhc_pre_kernel,
    f"{NAMESPACE}::mhc_post": mhc_post_kernel,
    f"{NAMESPACE}::mhc_fused_post_pre": mhc_fused_post_pre_kernel,
    f"{NAMESPACE}::hc_head": hc_head_kernel,
    f"{NAMESPACE}::get_mla_metadata": get_mla_metadata_kernel,
    f"{NAMESPACE}::sparse_decode": sparse_decode_kernel,
}


# ----------------------------------------------------------------------------- fake impls
def _mhc_pre_fake(h, fn, scale, base, rms_eps, hc_eps, iters):  # noqa: ANN001 - op signature
    t, m, hidden = h.shape
    f32 = torch.float32
    return h.new_empty(t, hidden), h.new_empty(t, m, dtype=f32), h.new_empty(t, m, m, dtype=f32)


def _mhc_post_fake(x, h, post, comb):  # noqa: ANN001
    return torch.empty_like(h)


def _mhc_fused_post_pre_fake(x, h, post, comb, fn, scale, base, rms_eps, hc_eps, iters):  # noqa: ANN001
    return (torch.empty_like(h), *_mhc_pre_fake(h, fn, scale, base, rms_eps, hc_eps, iters))


def _hc_head_fake(h, fn, scale, base, rms_eps, hc_eps):  # noqa: ANN001
    return h.new_empty(h.shape[0], h.shape[2])


def _get_mla_metadata_fake(seq_lens, num_heads, topk, num_sm_parts):  # noqa: ANN001
    i32 = torch.int32
    return (seq_lens.new_empty(num_sm_parts, METADATA_WIDTH, dtype=i32),
            seq_lens.new_empty(seq_lens.shape[0] + 1, dtype=i32))


def _sparse_decode_fake(q, kv, indices, attn_sink, tile_scheduler_metadata, num_splits, scale):  # noqa: ANN001
    return torch.empty_like(q)


_FAKES = {
    "mhc_pre": _mhc_pre_fake, "mhc_post": _mhc_post_fake, "mhc_fused_post_pre": _mhc_fused_post_pre_fake,
    "hc_head": _hc_head_fake, "get_mla_metadata": _get_mla_metadata_fake, "sparse_decode": _sparse_decode_fake,
}


def _op_exists(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not _op_exists(_name):
        _lib.define(_schema)
        # CUDA impl: composite torch standing in for the fused kernel. No CPU kernel on purpose.
        _lib.impl(_name, STAND_IN_KERNELS[f"{NAMESPACE}::{_name}"], "CUDA")
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name], lib=_lib)


def _silu_and_mul_with_clamp_kernel(result: torch.Tensor, input: torch.Tensor, limit: float,  # noqa: A002
                                    alpha: float = 1.0, beta: float = 0.0) -> None:
    check_silu_and_mul_buffers(result, input)
    result.copy_(oracle_silu_and_mul_with_clamp(input, limit, alpha, beta))


@contextlib.contextmanager
def cpu_reference_kernels() -> Iterator[None]:
    """Test-only: CPU kernels made of the oracle's math, inside this block (removed on exit), for the
    ``dsv4_cuda`` ops (``STAND_IN_KERNELS``) and for ``_C::silu_and_mul_with_clamp``, which has none either."""
    libs = [torch.library.Library(NAMESPACE, "IMPL"), torch.library.Library("_C", "IMPL")]
    try:
        for qualname, fn in STAND_IN_KERNELS.items():
            libs[0].impl(qualname.split("::")[1], fn, "CPU")
        libs[1].impl("silu_and_mul_with_clamp", _silu_and_mul_with_clamp_kernel, "CPU")
        yield
    finally:
        for lib in libs:
            lib._destroy()
