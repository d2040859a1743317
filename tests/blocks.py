"""Test fixtures: a small block written the CUDA way, and the same block in plain torch."""

from __future__ import annotations

import torch


class CudaOrientedBlock(torch.nn.Module):
    """A clamped-SwiGLU MLP written the CUDA way: aux-stream fork/join, a fused out-parameter op and a
    hard-coded `device="cuda"` constant. Build it under `cuda_compat` where there is no CUDA."""

    def __init__(self, hidden: int = 256, intermediate: int = 512, limit: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.limit = limit
        self.w13 = torch.nn.Parameter(torch.randn(2 * intermediate, hidden, generator=gen) * hidden**-0.5 * 4)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, intermediate, generator=gen) * intermediate**-0.5)
        self.gate = torch.nn.Parameter(torch.randn(hidden, generator=gen))
        self.aux_stream = torch.cuda.Stream()
        self.fork, self.join = torch.cuda.Event(), torch.cuda.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fork.record()
        h = x @ self.w13.T
        with torch.cuda.stream(self.aux_stream):
            self.fork.wait()
            bias = torch.sigmoid(x * self.gate).mean(-1, keepdim=True)
            self.join.record()
        self.join.wait()
        act = torch.empty(h.shape[0], h.shape[1] // 2, dtype=h.dtype, device=h.device)
        torch.ops._C.silu_and_mul_with_clamp(act, h, self.limit)
        ramp = torch.arange(x.shape[-1], device="cuda", dtype=x.dtype) / x.shape[-1]
        return act @ self.w2.T + bias * ramp


def native_block(block: CudaOrientedBlock, x: torch.Tensor) -> torch.Tensor:
    """The same block in plain torch: what the upstream XPU fallback runs eagerly."""
    h = x @ block.w13.T
    d = h.shape[-1] // 2
    act = torch.nn.functional.silu(h[..., :d].clamp(max=block.limit)) * h[..., d:].clamp(-block.limit, block.limit)
    ramp = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) / x.shape[-1]
    return act @ block.w2.T + torch.sigmoid(x * block.gate).mean(-1, keepdim=True) * ramp


def scheduled_decode(seq_lens, q, kv, indices, sink):
    """Sparse decode as the CUDA-oriented code calls it: the tile scheduler's metadata fed to the kernel."""
    meta, splits = torch.ops.dsv4_cuda.get_mla_metadata(seq_lens, q.shape[1], indices.shape[1], 8)
    return torch.ops.dsv4_cuda.sparse_decode(q, kv, indices, sink, meta, splits, q.shape[-1] ** -0.5)


def slow_sparse_decode(q, kv, indices, sink, scale):
    """The oracle, one (sequence, head) at a time in fp64: o[b, h] = sum_j p_j kv[indices[b, j]] over the valid
    j (index >= 0), p = softmax([s_j..., sink_h]) with s_j = scale * q[b, h] . kv[indices[b, j]], the sink's
    share dropped; no valid index gives zeros."""
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(q.shape[0]):
        keys = kv[[int(i) for i in indices[b] if i >= 0]].double()
        for h in range(q.shape[1]):
            logits = torch.cat([keys @ q[b, h].double() * scale, sink[h].double().reshape(1)])
            out[b, h] = logits.softmax(0)[:-1] @ keys
    return out
