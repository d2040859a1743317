"""User Triton kernels of the CUDA-oriented DeepSeek-V4 forward, launched with PDL.

Both kernels take a ``USE_GDC: tl.constexpr`` guarding ``tl.extra.cuda.gdc_wait()`` (wait for the
previous kernel's results) and ``gdc_launch_dependents()`` (let the next kernel start its prologue), and
are launched with ``launch_pdl=...`` (programmatic dependent launch, Hopper+):

* ``save_partial_states``: copy the compressor's pending kv / score rows into the state buffers;
* ``inv_rope``: inverse rotary embedding of the last ``rope_dim`` dims (GPT-J pairs) of the attention
  output, before the grouped output projection.

Triton is optional: this module imports on machines without Triton or without a driver. The
launchers use the kernel when the tensors are on CUDA and a CUDA GPU is present; otherwise plain torch
(same math), which is what eager CPU runs and what Dynamo traces where no GPU is, since it cannot trace
user Triton kernels there (fake ``cuda`` tensors captured on a CPU-only machine included).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import triton_fallback

from .rope import rope_last

try:  # Triton is optional: CPU-only machines may lack it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _save_states_kernel(src_kv, src_sc, dst_kv, dst_sc, width, BLOCK: tl.constexpr,
                            USE_GDC: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        kv = tl.load(src_kv + row * width + cols, mask=mask)
        sc = tl.load(src_sc + row * width + cols, mask=mask)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(dst_kv + row * width + cols, kv, mask=mask)
        tl.store(dst_sc + row * width + cols, sc, mask=mask)

    @triton.jit
    def _inv_rope_kernel(x, cos, sin, out, n_heads, D: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr):
        pid = tl.program_id(0)  # one (token, head) row of D elements
        t = pid // n_heads
        base = pid * D
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        cols = tl.arange(0, BLOCK_D)
        keep = cols < D - 2 * HALF
        tl.store(out + base + cols, tl.load(x + base + cols, mask=keep), mask=keep)
        i = tl.arange(0, BLOCK_H)
        m = i < HALF
        c = tl.load(cos + t * HALF + i, mask=m)
        s = -tl.load(sin + t * HALF + i, mask=m)  # inverse rotation
        ev_ptr = x + base + (D - 2 * HALF) + 2 * i
        e = tl.load(ev_ptr, mask=m).to(tl.float32)
        o = tl.load(ev_ptr + 1, mask=m).to(tl.float32)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        dst = out + base + (D - 2 * HALF) + 2 * i
        tl.store(dst, (e * c - o * s).to(out.dtype.element_ty), mask=m)
        tl.store(dst + 1, (o * c + e * s).to(out.dtype.element_ty), mask=m)


@triton_fallback("_save_states_kernel")
def _save_states_fallback(src_kv: torch.Tensor, src_sc: torch.Tensor, dst_kv: torch.Tensor, dst_sc: torch.Tensor,
                          width: int, BLOCK: int) -> None:
    """What `_save_states_kernel` does, in plain torch (for targets without Triton)."""
    dst_kv.copy_(src_kv.reshape(dst_kv.shape))
    dst_sc.copy_(src_sc.reshape(dst_sc.shape))


@triton_fallback("_inv_rope_kernel")
def _inv_rope_fallback(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, n_heads: int,
                       **block_sizes: int) -> None:
    """What `_inv_rope_kernel` does, in plain torch (for targets without Triton)."""
    out.copy_(rope_last(x.reshape(out.shape), cos, sin, inverse=True))


def _use_kernel(t: torch.Tensor) -> bool:
    """Whether to launch the Triton kernel: Triton is importable and a CUDA GPU is there to run it.

    Fake ``cuda`` tensors traced on a machine without a GPU take the plain-torch path: Dynamo handles a
    Triton kernel as a kernel only where a Triton-capable device exists; elsewhere it would trace into
    Triton's launcher, whose driver probe breaks the graph (and nothing could ever launch it there).
    """
    return HAS_TRITON and t.device.type == "cuda" and torch.cuda.is_available()


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA GPU of compute capability >= 9 (Hopper)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def save_partial_states(kv: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the pending compressor rows ``kv``, ``score`` ``[n, W]`` (fp32) as new state buffers."""
    dst_kv, dst_sc = torch.empty_like(kv), torch.empty_like(score)
    n, width = kv.shape
    if not _use_kernel(kv):  # CPU fallback only where eager CPU needs one
        dst_kv.copy_(kv)
        dst_sc.copy_(score)
        return dst_kv, dst_sc
    if n:
        pdl = pdl_supported(kv.device)
        _save_states_kernel[(n,)](
            kv.contiguous(), score.contiguous(), dst_kv, dst_sc, width,
            BLOCK=triton.next_power_of_2(width), USE_GDC=pdl, launch_pdl=pdl,
        )
    return dst_kv, dst_sc


def inv_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` with its last ``2 * cos.shape[-1]`` dims rotated back by each token's angles
    (``cos``, ``sin`` ``[T, rope_dim // 2]`` fp32): the oracle's ``rope_last(..., inverse=True)``."""
    if not _use_kernel(x):  # CPU fallback only where eager CPU needs one
        return rope_last(x, cos, sin, inverse=True)
    t, h, d = x.shape
    half = cos.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    if t:
        pdl = pdl_supported(x.device)
        _inv_rope_kernel[(t * h,)](
            x, cos.contiguous(), sin.contiguous(), out, h, D=d, HALF=half,
            BLOCK_D=triton.next_power_of_2(d), BLOCK_H=triton.next_power_of_2(half), USE_GDC=pdl, launch_pdl=pdl,
        )
    return out
