"""Per-sequence decoding state of the oracle.

One ``SequenceCache`` per sequence, one ``LayerCache`` per layer:

* ``window``: the roped K(=V) latents of the last ``<= sliding_window`` tokens ``[w, head_dim]``.
* ``compressor`` (compressed layers): a ``CompressorState`` with the fp32 projected rows of the
  tokens a future entry still needs (``kv`` and ``score`` with ``ape`` added, ``[n, coff * d]``; the
  rows of positions ``max(0, (length // r - (coff - 1)) * r) .. length - 1``) and every finished
  compressed entry ``entries [length // r, d]`` (normed, roped, model dtype).
* ``indexer`` (ratio-4 layers): the same for the indexer's own compressor; its ``entries`` are the
  index keys ``[length // 4, index_head_dim]``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CompressorState:
    """Pending projected rows (fp32) and finished entries of one compressor."""

    kv: torch.Tensor
    score: torch.Tensor
    entries: torch.Tensor

    @classmethod
    def empty(cls, width: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> CompressorState:
        """State of a sequence with no tokens."""
        rows = torch.empty(0, width, dtype=torch.float32, device=device)
        return cls(rows, rows.clone(), torch.empty(0, head_dim, dtype=dtype, device=device))


@dataclass
class LayerCache:
    """State of one layer for one sequence; ``length`` = tokens already processed."""

    length: int
    window: torch.Tensor
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class SequenceCache:
    """State of one sequence across all layers."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0

    def clone(self) -> SequenceCache:
        """Deep copy (tensors included)."""
        return copy.deepcopy(self)


def new_cache(model: nn.Module) -> SequenceCache:
    """An empty cache for ``model`` (a ``DeepseekV4Model``)."""
    layers = []
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    for layer in model.layers:
        attn = layer.attn
        window = torch.empty(0, attn.head_dim, dtype=dtype, device=device)
        comp = idx = None
        if attn.compressor is not None:
            c = attn.compressor
            comp = CompressorState.empty(c.coff * c.head_dim, c.head_dim, dtype, device)
        if attn.indexer is not None:
            c = attn.indexer.compressor
            idx = CompressorState.empty(c.coff * c.head_dim, c.head_dim, dtype, device)
        layers.append(LayerCache(0, window, comp, idx))
    return SequenceCache(layers, 0)
