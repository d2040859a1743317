"""DeepSeek-V4 parameters as nn.Modules (no layer math here: see ``oracle.py``).

The state_dict names follow the public checkpoint names (``layers.{i}.attn.wq_a.weight``, ...). Modules
carry the hyper-parameters the math needs as plain attributes (``compress_ratio``, ``head_dim``...).
Parameters that the reference math keeps in fp32 (mHC ``hc_*``, ``attn_sink``, compressor ``ape``,
gate ``bias``) are stored in fp32 whatever the model dtype; ``tid2eid`` is an int32 buffer.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from .config import DeepseekV4Config

_DeviceLike = torch.device | str | None


def _linear(in_features: int, out_features: int, dtype: torch.dtype, device: _DeviceLike) -> nn.Linear:
    # skip_init: weights are set by DeepseekV4Model.reset_parameters, no throw-away kaiming init.
    return torch.nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=False, dtype=dtype, device=device
    )


def _param(*shape: int, dtype: torch.dtype, device: _DeviceLike) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class RMSNorm(nn.Module):
    """Holds the weight of a weighted RMSNorm (math: ``oracle.rms_norm``)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)


class Compressor(nn.Module):
    """KV compressor of a compressed layer (or of an indexer): ``ratio`` tokens -> one entry of
    ``head_dim`` channels. Ratio 4 uses overlapping windows (``coff = 2``: each token projects to two
    halves, the first for the next entry's older half, the second for its own entry)."""

    def __init__(self, config: DeepseekV4Config, ratio: int, head_dim: int,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.coff = 2 if ratio == 4 else 1
        self.rope_dim = config.qk_rope_head_dim
        width = self.coff * head_dim
        self.wkv = _linear(config.hidden_size, width, dtype, device)
        self.wgate = _linear(config.hidden_size, width, dtype, device)
        self.ape = _param(ratio, width, dtype=torch.float32, device=device)
        self.norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device)


class Indexer(nn.Module):
    """Lightning indexer of a ratio-4 layer: scores compressed entries, keeps the top ``topk``."""

    def __init__(self, config: DeepseekV4Config, dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = _linear(config.q_lora_rank, self.n_heads * self.head_dim, dtype, device)
        self.weights_proj = _linear(config.hidden_size, self.n_heads, dtype, device)
        self.compressor = Compressor(config, 4, self.head_dim, dtype, device)


class Attention(nn.Module):
    """Latent MLA / MQA with a sink: one ``head_dim``-wide latent is both K and V."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.compress_ratio = config.compress_ratio(layer_idx)
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.window = config.sliding_window
        self.n_groups = config.o_groups
        self.o_lora_rank = config.o_lora_rank
        self.eps = config.rms_norm_eps
        hidden, d = config.hidden_size, config.head_dim
        self.wq_a = _linear(hidden, config.q_lora_rank, dtype, device)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, dtype, device)
        self.wq_b = _linear(config.q_lora_rank, self.n_heads * d, dtype, device)
        self.wkv = _linear(hidden, d, dtype, device)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
        # wo_a is grouped: weight [G * o_lora_rank, (n_heads / G) * head_dim], viewed [G, o_lora, ...].
        self.wo_a = _linear(self.n_heads * d // self.n_groups, self.n_groups * self.o_lora_rank, dtype, device)
        self.wo_b = _linear(self.n_groups * self.o_lora_rank, hidden, dtype, device)
        self.attn_sink = _param(self.n_heads, dtype=torch.float32, device=device)
        r = self.compress_ratio
        self.compressor = Compressor(config, r, d, dtype, device) if r else None
        self.indexer = Indexer(config, dtype, device) if r == 4 else None


class Gate(nn.Module):
    """MoE router: ``weight`` [E, H]; ``bias`` (e_score_correction_bias, fp32) on bias-routed layers,
    ``tid2eid`` [vocab, topk] int32 on hash-routed layers."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.hash = config.is_hash_layer(layer_idx)
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = _param(config.n_routed_experts, config.hidden_size, dtype=dtype, device=device)
        if self.hash:
            self.bias = None
            self.register_buffer(
                "tid2eid", torch.empty(config.vocab_size, self.topk, dtype=torch.int32, device=device)
            )
        else:
            self.bias = _param(config.n_routed_experts, dtype=torch.float32, device=device)
            self.tid2eid = None


class Expert(nn.Module):
    """SwiGLU expert: ``w2(silu_clamped(w1 x) * clamp(w3 x))``."""

    def __init__(self, hidden: int, inter: int, swiglu_limit: float,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.w1 = _linear(hidden, inter, dtype, device)
        self.w2 = _linear(inter, hidden, dtype, device)
        self.w3 = _linear(hidden, inter, dtype, device)


class MoE(nn.Module):
    """Routed experts plus ``n_shared_experts`` shared experts (fused into one Expert)."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        h, i, lim = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.gate = Gate(config, layer_idx, dtype, device)
        self.experts = nn.ModuleList(
            Expert(h, i, lim, dtype, device) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = Expert(h, config.n_shared_experts * i, lim, dtype, device)


def _hc_params(module: nn.Module, prefix: str, config: DeepseekV4Config, device: _DeviceLike) -> None:
    m, hidden = config.hc_mult, config.hidden_size
    f32 = torch.float32
    setattr(module, f"{prefix}_fn", _param(m * (m + 2), m * hidden, dtype=f32, device=device))
    setattr(module, f"{prefix}_base", _param(m * (m + 2), dtype=f32, device=device))
    setattr(module, f"{prefix}_scale", _param(3, dtype=f32, device=device))


class DecoderLayer(nn.Module):
    """One layer: mHC around attention and around the MoE."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int,
                 dtype: torch.dtype, device: _DeviceLike) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.compress_ratio = config.compress_ratio(layer_idx)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.attn = Attention(config, layer_idx, dtype, device)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.ffn = MoE(config, layer_idx, dtype, device)
        _hc_params(self, "hc_attn", config, device)
        _hc_params(self, "hc_ffn", config, device)


class DeepseekV4Model(nn.Module):
    """All DeepSeek-V4 parameters, initialised deterministically from ``seed``.

    Each tensor's values depend only on ``seed`` and its state_dict name, so a layer's weights do not
    change with the number of layers. On ``device="meta"`` nothing is initialised.
    """

    def __init__(self, config: DeepseekV4Config, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: _DeviceLike = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        h, m = config.hidden_size, config.hc_mult
        self.embed = torch.nn.utils.skip_init(
            nn.Embedding, config.vocab_size, h, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.head = _linear(h, config.vocab_size, dtype, device)
        f32 = torch.float32
        self.hc_head_fn = _param(m, m * h, dtype=f32, device=device)
        self.hc_head_base = _param(m, dtype=f32, device=device)
        self.hc_head_scale = _param(1, dtype=f32, device=device)
        if device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Re-initialise every tensor from ``seed`` (see ``init_tensor``)."""
        for name, t in self.state_dict(keep_vars=True).items():
            t.copy_(init_tensor(name, tuple(t.shape), seed, self.config))


def init_tensor(name: str, shape: tuple[int, ...], seed: int, config: DeepseekV4Config) -> torch.Tensor:
    """Deterministic initial value (fp32 or int32, CPU) of the state_dict entry ``name``.

    Matrices are ``N(0, 1) * fan_in**-0.5`` so activations stay O(1); norms ``1 + 0.1 N``; the
    embedding ``N(0, 1)``; small mHC bases/scales, sinks, ``ape`` and gate biases; ``tid2eid`` maps
    each token to ``topk`` distinct experts.
    """
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":
        vocab, k = shape
        return torch.rand(vocab, config.n_routed_experts, generator=g).topk(k, -1).indices.int()
    if name == "embed.weight":
        return randn(*shape)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * randn(*shape)
    if leaf.endswith("_base"):
        return 0.1 * randn(*shape)
    if leaf.endswith("_scale"):
        return 0.5 + 0.05 * randn(*shape)
    if leaf == "attn_sink":
        return 0.5 * randn(*shape)
    if leaf in ("ape", "bias"):
        return 0.1 * randn(*shape)
    if len(shape) == 2:
        return randn(*shape) * shape[1] ** -0.5
    raise KeyError(f"no init rule for {name} {shape}")


def load_safetensors(
    model: nn.Module, path_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
) -> list[str]:
    """Copy tensors from one or more safetensors shards into ``model`` (cast to each tensor's dtype).

    Raises ``KeyError`` for a name the model does not have and ``ValueError`` for a shape mismatch or
    a name found in two shards. Returns the sorted names the shards did not provide (left as they were).
    """
    from safetensors import safe_open

    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    targets = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    with torch.no_grad():
        for path in paths:
            with safe_open(os.fspath(path), framework="pt") as f:
                for name in f.keys():
                    if name not in targets:
                        raise KeyError(f"{path}: unknown tensor name {name!r}")
                    if name in seen:
                        raise ValueError(f"{path}: {name!r} appears in two shards")
                    src = f.get_tensor(name)
                    dst = targets[name]
                    if tuple(src.shape) != tuple(dst.shape):
                        raise ValueError(f"{name}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
                    dst.copy_(src)
                    seen.add(name)
    return sorted(set(targets) - seen)


def save_safetensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the whole state_dict of ``model`` to one safetensors file (checkpoint names)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, os.fspath(path))
