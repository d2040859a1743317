"""mHC on Triton targets in two kernels, registered with `torch.library.triton_op` so that Inductor inlines
them into the code it generates for any Triton device (CUDA, XPU); lowerings/mhc.py calls them there and
keeps plain torch everywhere else.

1. `dsv4_triton::mhc_project`: the projection of each token's `[K]` row on the `N` rows of `fn` and the
   row's sum of squares, as split-K partial sums `[S, T, NP]` (column `N` holds the sum of squares). A bf16
   row is exact in bf16, and `fn` is fp32: `fn = hi + mid + lo` in bf16 (24 mantissa bits in all), three
   bf16 dots on the matrix units with fp32 accumulation give fp32 accuracy. Other dtypes use an fp32 dot.
2. `dsv4_triton::mhc_gates_collapse`: one program per token sums the partials, RMS-scales them, forms the
   gates (sigmoid pre / post gates, the `m x m` softmax + Sinkhorn matrix held as a register tile) and
   collapses the `[m, H]` streams to `[H]`, optionally RMS-normalised and weighted (vLLM's fused norm).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# (BLOCK_T, K_PER_SPLIT, BLOCK_K, num_warps) of the projection for a few tokens (more, shorter splits: more
# programs) and for many, and the gates kernel's (BLOCK_H, num_warps): the fastest of a sweep on an H200
# (benchmarks/results/mhc_sweep.txt).
# A symbolic token count takes the many-token config, chosen to stay close to the best at every size.
PROJECT_FEW_TOKENS, PROJECT_MANY_TOKENS, FEW_TOKENS = (64, 512, 64, 4), (128, 512, 64, 4), 64
BLOCK_H, GATES_WARPS = 2048, 8
COLLAPSE_WITH_GATES, COLLAPSE_WITH_CARRIED, COLLAPSE_STREAM0 = 0, 1, 2


@triton.jit
def _project_kernel(
    src_ptr, fn_ptr, out_ptr, T, K, src_stride,
    N: tl.constexpr, NP: tl.constexpr, K_SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_FN_BF16: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    cols = tl.arange(0, NP)
    row_ok = rows < T
    acc = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = split * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(src_ptr + rows[:, None].to(tl.int64) * src_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(fn_ptr + cols[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & k_ok[:, None], other=0.0)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        if SPLIT_FN_BF16:
            hi = w.to(tl.bfloat16)
            rest = w - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            if DOT_IN_FP32:  # the same products, exact in fp32 (Triton's interpreter has no bf16 dot)
                acc = tl.dot(xf, lo.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(xf, mid.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(xf, hi.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, lo, acc)
                acc = tl.dot(x, mid, acc)
                acc = tl.dot(x, hi, acc)
        else:
            acc = tl.dot(xf, w, acc, input_precision="ieee")
    out = out_ptr + split * T * NP + rows * NP
    tl.store(out[:, None] + cols[None, :], acc, mask=row_ok[:, None] & (cols[None, :] < N))
    tl.store(out + N, sumsq, mask=row_ok)


@triton.jit
def _collapse_chunk(row_ptr, stream_stride, weights, h0, H, M: tl.constexpr, BLOCK_H: tl.constexpr):
    """sum_i weights[i] * stream_i[h0:h0 + BLOCK_H] in fp32."""
    hs = h0 + tl.arange(0, BLOCK_H)
    values = tl.load(row_ptr + tl.arange(0, M)[:, None] * stream_stride + hs[None, :],
                      mask=hs[None, :] < H, other=0.0)
    return tl.sum(weights[:, None] * values.to(tl.float32), axis=0)


@triton.jit
def _gates_collapse_kernel(
    partial_ptr, scale_ptr, base_ptr, res_ptr, carried_ptr, norm_weight_ptr,
    post_ptr, comb_ptr, gates_ptr, out_ptr,
    T, H, res_stride_t, res_stride_m, inv_k, rms_eps, pre_eps, sinkhorn_eps, post_mult, iters, norm_eps,
    M: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    BLOCK_H: tl.constexpr, HEAD: tl.constexpr, COLLAPSE: tl.constexpr, NORM: tl.constexpr,
    STATS_ROUNDED: tl.constexpr,
):
    # Inductor may pass float scalars as fp64: keep all of the math in fp32
    inv_k, rms_eps, pre_eps = tl.cast(inv_k, tl.float32), tl.cast(rms_eps, tl.float32), tl.cast(pre_eps, tl.float32)
    sinkhorn_eps, post_mult = tl.cast(sinkhorn_eps, tl.float32), tl.cast(post_mult, tl.float32)
    norm_eps = tl.cast(norm_eps, tl.float32)
    t = tl.program_id(0)
    splits = tl.arange(0, SP)
    split_ok = splits < S
    token = partial_ptr + splits * (T * NP) + t * NP
    mi = tl.arange(0, M)
    inv_rms = tl.rsqrt(tl.sum(tl.load(token + N, mask=split_ok, other=0.0), axis=0) * inv_k + rms_eps)
    pre_logits = tl.sum(tl.load(token[:, None] + mi[None, :], mask=split_ok[:, None], other=0.0), axis=0)
    pre = tl.sigmoid(pre_logits * inv_rms * tl.load(scale_ptr) + tl.load(base_ptr + mi)) + pre_eps
    tl.store(gates_ptr + t * M + mi, pre)
    if not HEAD:
        post_logits = tl.sum(tl.load(token[:, None] + M + mi[None, :], mask=split_ok[:, None], other=0.0), axis=0)
        post = tl.sigmoid(post_logits * inv_rms * tl.load(scale_ptr + 1) + tl.load(base_ptr + M + mi)) * post_mult
        tl.store(post_ptr + t * M + mi, post)
        ij = mi[:, None] * M + mi[None, :]
        comb_logits = tl.sum(tl.load(token[:, None, None] + 2 * M + ij[None, :, :],
                                     mask=split_ok[:, None, None], other=0.0), axis=0)
        z = comb_logits * inv_rms * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * M + ij)
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        comb = e / tl.sum(e, axis=1)[:, None] + sinkhorn_eps
        comb = comb / (tl.sum(comb, axis=0)[None, :] + sinkhorn_eps)
        for _ in range(1, iters):
            comb = comb / (tl.sum(comb, axis=1)[:, None] + sinkhorn_eps)
            comb = comb / (tl.sum(comb, axis=0)[None, :] + sinkhorn_eps)
        tl.store(comb_ptr + t * M * M + ij, comb)

    if COLLAPSE == 0:
        weights = pre
    elif COLLAPSE == 1:
        weights = tl.load(carried_ptr + t * M + mi).to(tl.float32)
    else:
        weights = (mi == 0).to(tl.float32)
    row = res_ptr + t.to(tl.int64) * res_stride_t
    out_row = out_ptr + t.to(tl.int64) * H
    out_ty = out_ptr.dtype.element_ty
    if NORM:
        squares = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            x = _collapse_chunk(row, res_stride_m, weights, h0, H, M, BLOCK_H)
            if STATS_ROUNDED:
                x = x.to(out_ty).to(tl.float32)
            squares += x * x
        inv_norm = tl.rsqrt(tl.sum(squares, axis=0) / tl.cast(H, tl.float32) + norm_eps)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        x = _collapse_chunk(row, res_stride_m, weights, h0, H, M, BLOCK_H).to(out_ty)
        if NORM:
            weight = tl.load(norm_weight_ptr + hs, mask=hs < H, other=0.0).to(out_ty).to(tl.float32)
            x = (x.to(tl.float32) * inv_norm * weight).to(out_ty)
        tl.store(out_row + hs, x, mask=hs < H)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton_op("dsv4_triton::mhc_project", mutates_args=())
def mhc_project(source: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """Split-K partials `[S, T, NP]` of `source [T, K] @ fn[N, K].T` (columns `:N`) and of the rows' sums of
    squares (column `N`); `S` splits of K, `NP` the next power of two above `N`."""
    tokens, k = source.shape
    n = fn.shape[0]
    few = isinstance(tokens, int) and tokens <= FEW_TOKENS
    block_t, k_per_split, block_k, warps = PROJECT_FEW_TOKENS if few else PROJECT_MANY_TOKENS
    padded = max(16, triton.next_power_of_2(n + 1))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    k_per_split = max(k_per_split, block_k)
    splits = triton.cdiv(k, k_per_split)
    partials = torch.empty((splits, tokens, padded), dtype=torch.float32, device=source.device)
    wrap_triton(_project_kernel)[(triton.cdiv(tokens, block_t), splits)](
        source, fn, partials, tokens, k, source.stride(0), N=n, NP=padded, K_SPLIT=k_per_split,
        BLOCK_T=block_t, BLOCK_K=block_k, SPLIT_FN_BF16=source.dtype == torch.bfloat16,
        DOT_IN_FP32=_interpreting(), num_warps=warps)
    return partials


@triton_op("dsv4_triton::mhc_gates_collapse", mutates_args=())
def mhc_gates_collapse(
    partials: torch.Tensor, n: int, k: int, hc_scale: torch.Tensor, hc_base: torch.Tensor, residual: torch.Tensor,
    carried: torch.Tensor | None, norm_weight: torch.Tensor | None, out_dtype: torch.dtype, rms_eps: float,
    pre_eps: float, sinkhorn_eps: float, post_mult: float, iters: int, norm_eps: float, head: bool, collapse: int,
    stats_rounded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(post [T, m], comb [T, m, m], gates [T, m], layer_input [T, H])` from `mhc_project`'s partials of a
    `K`-wide row on `n` fn rows; `residual [T, m, H]` (last dim contiguous) is collapsed with the pre gates, the
    `carried [T, m]` ones or stream 0 (`collapse`). `head`: `n = m` sigmoid gates only (post and comb empty)."""
    splits, tokens, padded = partials.shape
    m, hidden = residual.shape[1:]
    device = partials.device
    post = torch.empty((tokens, m), dtype=torch.float32, device=device)
    comb = torch.empty((tokens, m, m), dtype=torch.float32, device=device)
    gates = torch.empty((tokens, m), dtype=torch.float32, device=device)
    out = torch.empty((tokens, hidden), dtype=out_dtype, device=device)
    wrap_triton(_gates_collapse_kernel)[(tokens,)](
        partials, hc_scale, hc_base, residual, hc_scale if carried is None else carried,
        hc_scale if norm_weight is None else norm_weight, post, comb, gates, out,
        tokens, hidden, residual.stride(0), residual.stride(1), 1.0 / k, rms_eps, pre_eps, sinkhorn_eps, post_mult,
        iters, norm_eps, M=m, N=n, NP=padded, S=splits, SP=triton.next_power_of_2(splits), BLOCK_H=BLOCK_H,
        HEAD=head, COLLAPSE=collapse, NORM=norm_weight is not None, STATS_ROUNDED=stats_rounded,
        num_warps=GATES_WARPS)
    return post, comb, gates, out
