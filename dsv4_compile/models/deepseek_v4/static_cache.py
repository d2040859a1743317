"""Fixed-capacity, tensor-only decoding state for ``CudaDeepseekV4.forward_static``.

Serving-engine layout: every tensor has a capacity fixed at construction, sequences live in *slots*
(rows ``0 .. num_slots - 1``) and one extra slot, index ``num_slots``, is a trash row that masked-out
writes go to (a write is never skipped with a Python branch: its destination index is redirected).
Per layer ``i`` (``W = sliding_window``, ``E_i = ceil(max_seq_len / r_i)`` entries, 0 for window-only
layers):

* ``kv[i] [S + 1, W + E_i, head_dim]`` (model dtype): rows ``[0, W)`` are the window ring buffer (the
  roped K(=V) latent of position ``p`` lives in row ``p % W``), rows ``[W, W + E_i)`` the compressed
  entries (entry ``c`` in row ``W + c``). One buffer so that decode attends straight out of it: its
  flattened view is the ``kv`` of ``sparse_decode`` and candidate rows are plain int32 indices into it.
* ``comp_kv[i]``, ``comp_score[i]`` ``[S + 1, coff * r, coff * head_dim]`` fp32: the compressor's
  pending projected rows (score with ``ape`` added), a ring buffer over positions ``p % (coff * r)``
  holding the last ``coff * r`` positions (all that a future entry can read).
* ratio-4 layers: ``idx_kv[i]``, ``idx_score[i]`` (the indexer compressor's ring, ``[S + 1, 8, 2 * d_idx]``)
  and ``index_keys[i] [S + 1, E_i, d_idx]`` (the indexer's compressed keys).
* ``lengths [S + 1]`` int64: tokens already processed per slot (shared by all layers).

Window-only layers have ``None`` for the compressor / indexer tensors. ``reset(slot)`` frees a slot
(only ``lengths`` matters: rows at positions >= length are never read). ``load_sequence`` copies an
oracle ``SequenceCache`` into a slot (to continue an oracle prefill statically, and for tests).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cache import SequenceCache


class StaticCache:
    """Fixed-capacity cache of ``num_slots`` sequences of at most ``max_seq_len`` tokens each."""

    def __init__(self, model: nn.Module, max_seq_len: int, num_slots: int,
                 device: torch.device | str | None = None) -> None:
        cfg = model.config
        dtype = model.embed.weight.dtype
        device = model.embed.weight.device if device is None else torch.device(device)
        self.max_seq_len, self.num_slots, self.window = max_seq_len, num_slots, cfg.sliding_window
        s1 = num_slots + 1  # + trash slot
        f32 = torch.float32
        self.lengths = torch.zeros(s1, dtype=torch.int64, device=device)
        self.kv: list[torch.Tensor] = []
        self.n_entries: list[int] = []
        self.comp_kv: list[torch.Tensor | None] = []
        self.comp_score: list[torch.Tensor | None] = []
        self.idx_kv: list[torch.Tensor | None] = []
        self.idx_score: list[torch.Tensor | None] = []
        self.index_keys: list[torch.Tensor | None] = []
        for layer in model.layers:
            attn = layer.attn
            r = attn.compress_ratio
            ne = math.ceil(max_seq_len / r) if r else 0
            self.n_entries.append(ne)
            self.kv.append(torch.zeros(s1, self.window + ne, attn.head_dim, dtype=dtype, device=device))
            ck = cs = ik = isc = keys = None
            if r:
                c = attn.compressor
                ck = torch.zeros(s1, c.coff * r, c.coff * c.head_dim, dtype=f32, device=device)
                cs = torch.zeros_like(ck)
            if attn.indexer is not None:
                c = attn.indexer.compressor
                ik = torch.zeros(s1, c.coff * c.ratio, c.coff * c.head_dim, dtype=f32, device=device)
                isc = torch.zeros_like(ik)
                keys = torch.zeros(s1, math.ceil(max_seq_len / c.ratio), c.head_dim, dtype=dtype, device=device)
            self.comp_kv.append(ck)
            self.comp_score.append(cs)
            self.idx_kv.append(ik)
            self.idx_score.append(isc)
            self.index_keys.append(keys)

    @property
    def trash(self) -> int:
        """Index of the trash slot (masked-out writes land there)."""
        return self.num_slots

    def reset(self, slot: int) -> None:
        """Free ``slot`` for a new sequence."""
        self.lengths[slot] = 0

    @torch.no_grad()
    def load_sequence(self, slot: int, seq: SequenceCache) -> None:
        """Copy an oracle ``SequenceCache`` into ``slot`` (its length must fit ``max_seq_len``)."""
        n = seq.length
        if n > self.max_seq_len:
            raise ValueError(f"sequence of {n} tokens > max_seq_len {self.max_seq_len}")
        self.lengths[slot] = n
        w = self.window
        for i, lc in enumerate(seq.layers):
            win = lc.window
            pos = torch.arange(n - win.shape[0], n)
            self.kv[i][slot, pos % w] = win.to(self.kv[i].dtype)
            for state, ring_kv, ring_sc, dst, base in (
                (lc.compressor, self.comp_kv[i], self.comp_score[i], self.kv[i], w),
                (lc.indexer, self.idx_kv[i], self.idx_score[i], self.index_keys[i], 0),
            ):
                if state is None:
                    continue
                ne = state.entries.shape[0]
                dst[slot, base:base + ne] = state.entries.to(dst.dtype)
                rows = state.kv.shape[0]
                ring = ring_kv.shape[1]
                keep = min(rows, ring)
                rpos = torch.arange(n - keep, n) % ring
                ring_kv[slot, rpos] = state.kv[rows - keep:]
                ring_sc[slot, rpos] = state.score[rows - keep:]


def prefill_inputs(cache: StaticCache, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, slots)`` ``[n]`` of the next ``n`` tokens of ``slot`` (prefill or a prefill chunk)."""
    dev = cache.lengths.device
    return cache.lengths[slot] + torch.arange(n, device=dev), torch.full((n,), slot, device=dev)


def decode_inputs(cache: StaticCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, slots)`` ``[B]`` of one next token for each of the distinct ``slots``."""
    slots = slots.to(cache.lengths.device, torch.int64)
    return cache.lengths[slots].clone(), slots


def mark_tokens_dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark dim 0 (tokens) of ``forward_static``'s ``[T]`` inputs unbacked-dynamic before the first
    compiled call, so that one graph serves every T, including T = 1 (a backed dynamic dim would be
    specialised at 0/1 and recompile once for a single token / single sequence)."""
    for t in tensors:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    return tensors
