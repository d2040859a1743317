"""DeepSeek-V4 configuration with the public ``config.json`` (hf_config) field names."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

_FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]
# V4-Pro's per-layer pattern is not confirmed; we extend Flash's pattern to 61 layers.
_PRO_RATIOS = [0, 0] + [4, 128] * 29 + [4, 0]


def _yarn() -> dict[str, Any]:
    # mscale is off: YaRN only rescales rotary frequencies, never the attention scale.
    return {
        "type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    }


@dataclass
class DeepseekV4Config:
    """Model hyper-parameters; defaults are DeepSeek-V4-Flash.

    ``compress_ratios[i]`` is layer i's KV compression ratio: 0 = sliding window only, 4 = compressed
    entries chosen by the indexer (overlapping windows), any other r (128 in the real models) = every
    causal compressed entry. The public lists carry one trailing entry more than ``num_hidden_layers``
    (the multi-token-prediction layer, which this package does not build); only the first
    ``num_hidden_layers`` entries are used. Rotary embeddings act on the LAST ``qk_rope_head_dim`` dims;
    window-only layers use ``rope_theta`` without scaling, compressed layers ``compress_rope_theta`` with
    ``rope_scaling`` (YaRN).
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    sliding_window: int = 128
    compress_ratios: list[int] = field(default_factory=lambda: list(_FLASH_RATIOS))
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=_yarn)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        if len(self.compress_ratios) < self.num_hidden_layers:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        if self.num_key_value_heads != 1:
            raise ValueError("DeepSeek-V4 attention is MQA: num_key_value_heads must be 1")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(self.head_dim, self.index_head_dim):
            raise ValueError("qk_rope_head_dim must be even and fit in head_dim and index_head_dim")
        if self.num_attention_heads % self.o_groups:
            raise ValueError("num_attention_heads must be divisible by o_groups")
        if any(r < 0 for r in self.compress_ratios):
            raise ValueError("compress ratios must be >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok > n_routed_experts")

    # ----------------------------------------------------------------- per-layer views
    def compress_ratio(self, layer_idx: int) -> int:
        """Compression ratio of layer ``layer_idx`` (0 = window only)."""
        return self.compress_ratios[layer_idx]

    def is_hash_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` routes its MoE by the token-id table ``tid2eid``."""
        return layer_idx < self.num_hash_layers

    # ----------------------------------------------------------------- constructors
    @classmethod
    def flash(cls) -> DeepseekV4Config:
        """DeepSeek-V4-Flash (43 layers, hidden 4096, 256 experts)."""
        return cls()

    @classmethod
    def pro(cls) -> DeepseekV4Config:
        """DeepSeek-V4-Pro (61 layers, hidden 7168, 384 experts); compress_ratios extrapolated."""
        return cls(
            hidden_size=7168,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            o_lora_rank=1024,
            o_groups=16,
            compress_ratios=list(_PRO_RATIOS),
            index_topk=1024,
            n_routed_experts=384,
            moe_intermediate_size=3072,
            routed_scaling_factor=2.5,
        )

    @classmethod
    def tiny(cls, heavy_ratio: int = 16) -> DeepseekV4Config:
        """A ~1 MB model with every structural feature of V4, fast on CPU.

        Layers: 0 = window only (hash-routed MoE), 1 = ratio 4 (compressor + indexer),
        2 = heavy ratio, 3 = ratio 4. The heavy ratio is 16 by default (instead of 128) so that a
        40-token prefill already produces heavy entries; ``tiny(heavy_ratio=128)`` is the real ratio
        (needs >= 128 tokens to produce an entry). sliding_window 8 and index_topk 4 make ~40-token
        prefills evict window tokens and select a strict subset of the ratio-4 entries.
        """
        return cls(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            head_dim=32,
            qk_rope_head_dim=16,
            q_lora_rank=32,
            o_lora_rank=16,
            o_groups=2,
            sliding_window=8,
            compress_ratios=[0, 4, heavy_ratio, 4],
            index_n_heads=4,
            index_head_dim=32,
            index_topk=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            num_hash_layers=1,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepseekV4Config:
        """Build from a hf ``config.json`` dict; keys this dataclass does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **overrides: Any) -> DeepseekV4Config:
        """A copy with some fields replaced, e.g. ``flash().with_(n_routed_experts=8, num_hidden_layers=4)``
        for Flash-shaped layers with fewer experts (compress_ratios keeps its first layers)."""
        return dataclasses.replace(copy.deepcopy(self), **overrides)
