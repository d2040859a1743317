"""Native oracle of DeepSeek-V4: the layer math in plain torch (no custom ops, streams or Triton).

Functions take the parameter modules of ``modeling.py`` and activations. Tokens of several sequences
are concatenated along dim 0; ``seq_lens[i]`` new tokens of sequence i continue ``caches[i]``
(positions ``caches[i].length ...``). Prefill = one sequence of N tokens; decode = B sequences of 1.
Precision: mHC, the MoE gate, the compressor and all softmaxes in fp32; projections in the weights'
dtype (bf16); attention scores/probabilities in fp32 over model-dtype q/k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CompressorState, LayerCache, SequenceCache, new_cache
from .mhc import hc_head, mhc_fused_post_pre, mhc_post, mhc_pre, mhc_weights, sinkhorn
from .modeling import Attention, Compressor, DecoderLayer, DeepseekV4Model, Expert, Indexer, MoE
from .rope import layer_inv_freq, rope_cos_sin, rope_last, yarn_inv_freq

__all__ = [
    "attention", "compressor_forward", "decoder_layer", "expert_forward", "hc_head", "indexer_topk",
    "layer_inv_freq", "mhc_fused_post_pre", "mhc_post", "mhc_pre", "mhc_weights", "model_forward", "moe",
    "new_caches", "oracle_decode", "oracle_prefill", "rms_norm", "rope_cos_sin", "rope_last", "sinkhorn",
    "yarn_inv_freq",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim; fp32 math, ``x.dtype`` out."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _silu_and_mul_with_clamp(x: torch.Tensor, limit: float, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    # gate = clamp(first half, max=L), up = clamp(second half, -L, L); gate*sigmoid(alpha*gate)*(up+beta).
    # fp32 math, rounded to x.dtype after the silu and after the product.
    d = x.shape[-1] // 2
    gate = x[..., :d].float().clamp(max=limit)
    up = x[..., d:].float().clamp(-limit, limit)
    act = (gate * torch.sigmoid(alpha * gate)).to(x.dtype).float()
    return (act * (up + beta)).to(x.dtype)


# ----------------------------------------------------------------------------- compressor, indexer
def compressor_forward(
    comp: Compressor, x: torch.Tensor, start_pos: int, state: CompressorState, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Feed tokens ``x [n, H]`` at positions ``start_pos..`` of one sequence; return the entries they
    complete ``[n_new, d]`` (also appended to ``state.entries``).

    Token p gives fp32 rows ``kv = x Wkv^T`` and ``score = x Wgate^T + ape[p % r]`` (``coff * d`` wide).
    Entry c (done when ``(p + 1) % r == 0``) softmaxes, per channel, the scores of the window of the
    ``coff * r`` tokens ending at ``c*r + r - 1`` (older r tokens: channels ``[:d]``, newer r:
    ``[(coff-1)d:]``; positions < 0 score -inf), sums the kv with those weights, applies the weighted
    RMSNorm and rotates by position ``c * r``.
    """
    r, coff, d = comp.ratio, comp.coff, comp.head_dim
    n = x.shape[0]
    pos = torch.arange(start_pos, start_pos + n, device=x.device)
    xf = x.float()
    kv = xf @ comp.wkv.weight.float().T
    score = xf @ comp.wgate.weight.float().T + comp.ape.float()[pos % r]
    rows_kv = torch.cat([state.kv, kv])
    rows_sc = torch.cat([state.score, score])
    first = start_pos - state.kv.shape[0]  # position of rows_*[0]
    c0, c1 = start_pos // r, (start_pos + n) // r
    new = x.new_empty(0, d)
    if c1 > c0:
        p0 = (c0 - (coff - 1)) * r  # first position the new entries read
        pad = first - p0
        assert pad >= 0 and (pad == 0 or first == 0), "compressor state out of sync"
        pk = torch.cat([rows_kv.new_zeros(pad, coff * d), rows_kv])
        ps = torch.cat([rows_sc.new_full((pad, coff * d), float("-inf")), rows_sc])
        nb = c1 - c0 + coff - 1
        blk_kv = pk[: nb * r].view(nb, r, coff * d)
        blk_sc = ps[: nb * r].view(nb, r, coff * d)
        win_kv = blk_kv[coff - 1:, :, (coff - 1) * d:]
        win_sc = blk_sc[coff - 1:, :, (coff - 1) * d:]
        if coff == 2:
            win_kv = torch.cat([blk_kv[:-1, :, :d], win_kv], dim=1)
            win_sc = torch.cat([blk_sc[:-1, :, :d], win_sc], dim=1)
        entry = (win_kv * win_sc.softmax(dim=1)).sum(1)
        entry = rms_norm(entry, comp.norm.weight, comp.norm.eps)
        cos, sin = rope_cos_sin(torch.arange(c0, c1, device=x.device) * r, inv_freq)
        new = rope_last(entry, cos, sin).to(x.dtype)
        state.entries = torch.cat([state.entries, new])
    keep = max(0, (c1 - (coff - 1)) * r) - first
    state.kv, state.score = rows_kv[keep:].clone(), rows_sc[keep:].clone()
    return new


def indexer_topk(
    indexer: Indexer, x: torch.Tensor, qr: torch.Tensor, start_pos: int, state: CompressorState,
    inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Indices ``[n, index_topk]`` (int64, -1 = none) of the compressed entries each query attends.

    Updates the indexer's compressor with ``x``. ``qi = (qr Wq_b^T).view(n, nh, d)`` (roped),
    ``w = weights_proj(x) / sqrt(d * nh)``, ``logit[t, j] = sum_h w[t, h] relu(qi[t, h] . key[j])``
    over causal entries ``j < (p + 1) // 4``; the top ``index_topk`` (all of them if fewer), in
    descending logit order, ties to the lower entry index.
    """
    compressor_forward(indexer.compressor, x, start_pos, state, inv_freq)
    pos = torch.arange(start_pos, start_pos + x.shape[0], device=x.device)
    logits = index_scores(indexer, x, qr, pos, inv_freq, state.entries)
    causal = torch.arange(state.entries.shape[0], device=x.device)[None, :] < ((pos + 1) // 4)[:, None]
    return top_entries(logits.masked_fill(~causal, float("-inf")), indexer.topk)


def index_scores(indexer: Indexer, x: torch.Tensor, qr: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
                 keys: torch.Tensor) -> torch.Tensor:
    """Unmasked indexer logits ``[n, E]``: ``sum_h w[t, h] relu(qi[t, h] . keys[j])`` (fp32)."""
    n, nh, d = x.shape[0], indexer.n_heads, indexer.head_dim
    cos, sin = rope_cos_sin(pos, inv_freq)
    qi = rope_last(F.linear(qr, indexer.wq_b.weight).view(n, nh, d), cos, sin)
    w = F.linear(x, indexer.weights_proj.weight).float() * (d ** -0.5 * nh ** -0.5)
    return torch.einsum("th,thc->tc", w, torch.einsum("thd,cd->thc", qi.float(), keys.float()).relu())


def top_entries(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[n, k]`` of the ``k`` largest logits per row (-inf ones and missing ones -> -1)."""
    n, kk = logits.shape[0], min(k, logits.shape[1])
    # Stable sort: ties (e.g. every head's relu at 0) go to the older entry, so the choice is well defined.
    vals, idx = logits.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :kk], idx[:, :kk]
    idx = idx.masked_fill(vals == float("-inf"), -1)
    return torch.cat([idx, idx.new_full((n, k - kk), -1)], dim=1)


# ----------------------------------------------------------------------------- attention
def _attend_sequence(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, qr: torch.Tensor,
    cache: LayerCache, inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Attention output ``[n, heads, D]`` (before inverse rope) of one sequence's new tokens."""
    start, n, dev = cache.length, q.shape[0], q.device
    pos = torch.arange(start, start + n, device=dev)
    keys = torch.cat([cache.window, k])
    kpos = torch.arange(start - cache.window.shape[0], start + n, device=dev)
    mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - attn.window)
    cache.window = keys[-attn.window:].clone()
    r = attn.compress_ratio
    if r:
        compressor_forward(attn.compressor, x, start, cache.compressor, inv_freq)
        entries = cache.compressor.entries
        nc = entries.shape[0]
        if attn.indexer is not None:
            idx = indexer_topk(attn.indexer, x, qr, start, cache.indexer, inv_freq)
            idx = torch.where(idx < 0, nc, idx)
            cmask = torch.zeros(n, nc + 1, dtype=torch.bool, device=dev).scatter_(1, idx, True)[:, :nc]
        else:
            cmask = torch.arange(nc, device=dev)[None, :] < ((pos + 1) // r)[:, None]
        keys = torch.cat([keys, entries])
        mask = torch.cat([mask, cmask], dim=1)
    s = torch.einsum("thd,kd->thk", q.float(), keys.float()) * attn.head_dim ** -0.5
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    sink = attn.attn_sink.float()[None, :, None].expand(n, -1, 1)
    p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
    cache.length = start + n
    return torch.einsum("thk,kd->thd", p, keys.float()).to(q.dtype)


def attention(
    attn: Attention, x: torch.Tensor, caches: Sequence[LayerCache], seq_lens: Sequence[int]
) -> torch.Tensor:
    """Attention sub-layer on normed ``x [T, H]`` -> ``[T, H]``; advances the layer caches.

    ``q = rope(rmsnorm_h(wq_b(q_norm(wq_a x))))``, ``k = v = rope(kv_norm(wkv x))`` (MQA, one latent);
    each query attends its window ``[p - sw + 1, p]`` plus compressed entries (ratio 4: indexer top-k;
    other ratios: all entries ``c < (p + 1) // r``) with a per-head sink logit; the output is
    inverse-roped, projected per group by ``wo_a`` and then by ``wo_b``.
    """
    t, nh, d, eps = x.shape[0], attn.n_heads, attn.head_dim, attn.eps
    inv_freq = layer_inv_freq(attn.config, attn.compress_ratio).to(x.device)
    pos = torch.cat([
        torch.arange(c.length, c.length + n, device=x.device) for c, n in zip(caches, seq_lens, strict=True)
    ])
    cos, sin = rope_cos_sin(pos, inv_freq)
    qr = rms_norm(F.linear(x, attn.wq_a.weight), attn.q_norm.weight, eps)
    q = rope_last(rms_norm(F.linear(qr, attn.wq_b.weight).view(t, nh, d), None, eps), cos, sin)
    k = rope_last(rms_norm(F.linear(x, attn.wkv.weight), attn.kv_norm.weight, eps), cos, sin)
    outs, off = [], 0
    for cache, n in zip(caches, seq_lens, strict=True):
        sl = slice(off, off + n)
        outs.append(_attend_sequence(attn, q[sl], k[sl], x[sl], qr[sl], cache, inv_freq))
        off += n
    o = rope_last(torch.cat(outs), cos, sin, inverse=True)
    g = attn.n_groups
    wo_a = attn.wo_a.weight.view(g, attn.o_lora_rank, -1)
    o = torch.einsum("tgd,gld->tgl", o.reshape(t, g, -1), wo_a).reshape(t, -1)
    return F.linear(o, attn.wo_b.weight)


# ----------------------------------------------------------------------------- MoE
def expert_forward(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """``w2(silu_and_mul_with_clamp([w1 x | w3 x], swiglu_limit))``."""
    h = torch.cat([F.linear(x, expert.w1.weight), F.linear(x, expert.w3.weight)], dim=-1)
    return F.linear(_silu_and_mul_with_clamp(h, expert.swiglu_limit), expert.w2.weight)


def moe(ffn: MoE, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """MoE on normed ``x [T, H]``: ``scores = sqrt(softplus(x G^T))`` (fp32); experts by
    ``tid2eid[input_ids]`` (hash layers) or top-k of ``scores + bias``; weights = chosen scores,
    normalised, times routed_scaling_factor; plus the shared expert. fp32 sum, ``x.dtype`` out."""
    gate = ffn.gate
    if gate.scoring_func != "sqrtsoftplus":
        raise NotImplementedError(gate.scoring_func)
    scores = torch.sqrt(F.softplus(x.float() @ gate.weight.float().T))
    if gate.hash:
        ids = gate.tid2eid[input_ids].long()
    else:
        ids = (scores + gate.bias.float()).topk(gate.topk, dim=-1).indices
    w = scores.gather(1, ids)
    if gate.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    w = w * gate.route_scale
    out = expert_forward(ffn.shared_experts, x).float()
    for e in ids.unique().tolist():
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        y = expert_forward(ffn.experts[e], x[rows]).float()
        out.index_add_(0, rows, y * w[rows, slot, None])
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- layer, model
def decoder_layer(
    layer: DecoderLayer, h: torch.Tensor, input_ids: torch.Tensor,
    caches: Sequence[LayerCache], seq_lens: Sequence[int],
) -> torch.Tensor:
    """One layer on the stream ``h [T, m, H]``: mHC pre -> attn_norm -> attention -> mHC post, then
    mHC pre -> ffn_norm -> MoE -> mHC post (the two middle steps fused as ``mhc_fused_post_pre``)."""
    cfg = layer.attn.config
    kw = dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, iters=cfg.hc_sinkhorn_iters)
    x, post, comb = mhc_pre(h, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base, **kw)
    x = attention(layer.attn, rms_norm(x, layer.attn_norm.weight, layer.attn_norm.eps), caches, seq_lens)
    h, x, post, comb = mhc_fused_post_pre(
        x, h, post, comb, layer.hc_ffn_fn, layer.hc_ffn_scale, layer.hc_ffn_base, **kw
    )
    x = moe(layer.ffn, rms_norm(x, layer.ffn_norm.weight, layer.ffn_norm.eps), input_ids)
    return mhc_post(x, h, post, comb)


def model_forward(
    model: DeepseekV4Model, input_ids: torch.Tensor, caches: Sequence[SequenceCache], seq_lens: Sequence[int]
) -> torch.Tensor:
    """Logits ``[T, vocab]`` (fp32) of the concatenated new tokens; advances every cache.

    ``h = embed(ids)`` copied ``hc_mult`` times -> layers -> ``hc_head`` -> norm -> head.
    """
    if sum(seq_lens) != input_ids.shape[0] or len(caches) != len(seq_lens):
        raise ValueError("seq_lens must sum to the number of tokens, one per cache")
    cfg = model.config
    x = F.embedding(input_ids, model.embed.weight)
    h = x[:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()
    for i, layer in enumerate(model.layers):
        h = decoder_layer(layer, h, input_ids, [c.layers[i] for c in caches], seq_lens)
    x = hc_head(h, model.hc_head_fn, model.hc_head_scale, model.hc_head_base,
                rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)
    x = rms_norm(x, model.norm.weight, model.norm.eps)
    for c, n in zip(caches, seq_lens, strict=True):
        c.length += n
    return F.linear(x, model.head.weight).float()


@torch.no_grad()
def oracle_prefill(
    model: DeepseekV4Model, input_ids: torch.Tensor, cache: SequenceCache | None = None
) -> tuple[torch.Tensor, SequenceCache]:
    """Prefill one sequence: ``input_ids [N]`` at positions ``0..N-1`` (or continuing ``cache``,
    which is then advanced in place: chunked prefill). Returns ``(logits [N, vocab] fp32, cache)``."""
    cache = new_cache(model) if cache is None else cache
    return model_forward(model, input_ids, [cache], [input_ids.shape[0]]), cache


@torch.no_grad()
def oracle_decode(
    model: DeepseekV4Model, input_ids: torch.Tensor, caches: Sequence[SequenceCache]
) -> torch.Tensor:
    """Decode one token for each of B sequences: ``input_ids [B]``, token b at position
    ``caches[b].length``; advances the caches in place. Returns logits ``[B, vocab]`` fp32."""
    if input_ids.shape[0] != len(caches):
        raise ValueError("one token per cache")
    return model_forward(model, input_ids, caches, [1] * len(caches))


def new_caches(model: nn.Module, n: int) -> list[SequenceCache]:
    """``n`` empty caches."""
    return [new_cache(model) for _ in range(n)]
