"""Slow, per-token fp64 reference of DeepSeek-V4 (test helper, independent of the oracle's code).

Everything is written from the definitions, one query token (and mostly one head) at a time, for a
single sequence prefilled from position 0: explicit candidate lists (window + compressed entries),
explicit compressor windows, explicit indexer scores, explicit Sinkhorn loops. Only the parameter
modules of ``dsv4_compile.models.deepseek_v4.modeling`` are read (weights cast to fp64).
"""

from __future__ import annotations

import math

import torch

D64 = torch.float64


def w64(t: torch.Tensor) -> torch.Tensor:
    """A parameter as fp64."""
    return t.detach().to(D64)


def rmsnorm(v: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of one vector."""
    out = v / math.sqrt(float((v * v).mean()) + eps)
    return out * w64(weight) if weight is not None else out


def rope_freqs(config, ratio: int) -> list[float]:
    """Per-pair rotary frequency of a layer (YaRN on compressed layers), as Python floats."""
    dim = config.qk_rope_head_dim
    base = config.compress_rope_theta if ratio else config.rope_theta
    freqs = [base ** (-(2 * i) / dim) for i in range(dim // 2)]
    rs = config.rope_scaling
    if not ratio or not rs:
        return freqs
    orig, factor = rs["original_max_position_embeddings"], rs["factor"]

    def dim_turning(times: float) -> float:  # pair index whose period fits `times` times in orig
        return dim * math.log(orig / (times * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(dim_turning(rs["beta_fast"])), 0)
    hi = min(math.ceil(dim_turning(rs["beta_slow"])), dim - 1)
    out = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - lo) / (hi - lo if hi > lo else 0.001), 0.0), 1.0)
        out.append(f * (1 - ramp) + (f / factor) * ramp)
    return out


def rotate(v: torch.Tensor, pos: int, freqs: list[float], inverse: bool = False) -> torch.Tensor:
    """GPT-J rotation of the last 2*len(freqs) dims of one vector by position ``pos``."""
    out = v.clone()
    base = v.shape[0] - 2 * len(freqs)
    for i, f in enumerate(freqs):
        a = pos * f
        c, s = math.cos(a), (-math.sin(a) if inverse else math.sin(a))
        e, o = v[base + 2 * i], v[base + 2 * i + 1]
        out[base + 2 * i] = e * c - o * s
        out[base + 2 * i + 1] = o * c + e * s
    return out


def compressed_entries(comp, xs: torch.Tensor, freqs: list[float], eps: float) -> torch.Tensor:
    """All entries ``[N // r, d]`` a compressor makes from the tokens ``xs [N, H]`` (positions 0..)."""
    r, d = comp.ratio, comp.head_dim
    overlap = r == 4
    wkv, wg, ape = w64(comp.wkv.weight), w64(comp.wgate.weight), w64(comp.ape)
    entries = []
    for c in range(xs.shape[0] // r):
        kvs, scores = [], []
        if overlap:  # the previous r tokens contribute their first d channels
            for p in range(c * r - r, c * r):
                if p >= 0:
                    x = xs[p].to(D64)
                    kvs.append((wkv @ x)[:d])
                    scores.append((wg @ x + ape[p % r])[:d])
        for p in range(c * r, c * r + r):
            x = xs[p].to(D64)
            lo = d if overlap else 0
            kvs.append((wkv @ x)[lo:lo + d])
            scores.append((wg @ x + ape[p % r])[lo:lo + d])
        kv, sc = torch.stack(kvs), torch.stack(scores)
        weights = torch.exp(sc - sc.max(0).values) / torch.exp(sc - sc.max(0).values).sum(0)
        entry = (weights * kv).sum(0)
        entries.append(rotate(rmsnorm(entry, comp.norm.weight, eps), c * r, freqs))
    return torch.stack(entries) if entries else torch.zeros(0, d, dtype=D64)


def indexer_choices(indexer, xs: torch.Tensor, qrs: torch.Tensor, freqs: list[float], eps: float) -> list[list[int]]:
    """For each token t, the sorted indices of the entries its indexer picks (top index_topk)."""
    keys = compressed_entries(indexer.compressor, xs, freqs, eps)
    nh, d = indexer.n_heads, indexer.head_dim
    wq, wp = w64(indexer.wq_b.weight), w64(indexer.weights_proj.weight)
    out = []
    for t in range(xs.shape[0]):
        q = (wq @ qrs[t]).view(nh, d)
        q = torch.stack([rotate(q[h], t, freqs) for h in range(nh)])
        hw = (wp @ xs[t].to(D64)) / math.sqrt(d * nh)
        logits = []
        for j in range((t + 1) // 4):
            logits.append(sum(float(hw[h]) * max(float(q[h] @ keys[j]), 0.0) for h in range(nh)))
        order = sorted(range(len(logits)), key=lambda j: -logits[j])
        out.append(sorted(order[: indexer.topk]))
    return out


def attention(attn, xs: torch.Tensor) -> torch.Tensor:
    """Attention sub-layer output ``[N, H]`` (fp64) for normed inputs ``xs [N, H]``."""
    cfg, r = attn.config, attn.compress_ratio
    eps, nh, d, sw = cfg.rms_norm_eps, attn.n_heads, attn.head_dim, cfg.sliding_window
    freqs = rope_freqs(cfg, r)
    n = xs.shape[0]
    qrs = torch.stack([rmsnorm(w64(attn.wq_a.weight) @ xs[t].to(D64), attn.q_norm.weight, eps) for t in range(n)])
    keys = [rotate(rmsnorm(w64(attn.wkv.weight) @ xs[t].to(D64), attn.kv_norm.weight, eps), t, freqs)
            for t in range(n)]
    entries = compressed_entries(attn.compressor, xs, freqs, eps) if r else None
    chosen = indexer_choices(attn.indexer, xs, qrs, freqs, eps) if r == 4 else None
    sink = w64(attn.attn_sink)
    g, lo = attn.n_groups, attn.o_lora_rank
    wo_a = w64(attn.wo_a.weight).view(g, lo, -1)
    outs = []
    for t in range(n):
        cands = [keys[j] for j in range(max(0, t - sw + 1), t + 1)]
        if r == 4:
            cands += [entries[j] for j in chosen[t]]
        elif r:
            cands += [entries[j] for j in range((t + 1) // r)]
        kmat = torch.stack(cands)
        q = (w64(attn.wq_b.weight) @ qrs[t]).view(nh, d)
        heads = []
        for h in range(nh):
            qh = rotate(rmsnorm(q[h], None, eps), t, freqs)
            s = (kmat @ qh) / math.sqrt(d)
            m = max(float(s.max()), float(sink[h]))
            e = torch.exp(s - m)
            o = (e[:, None] * kmat).sum(0) / (e.sum() + math.exp(float(sink[h]) - m))
            heads.append(rotate(o, t, freqs, inverse=True))
        o = torch.stack(heads).view(g, -1)
        low = torch.cat([wo_a[i] @ o[i] for i in range(g)])
        outs.append(w64(attn.wo_b.weight) @ low)
    return torch.stack(outs)


def _expert(expert, x: torch.Tensor, limit: float) -> torch.Tensor:
    a = (w64(expert.w1.weight) @ x).clamp(max=limit)
    b = (w64(expert.w3.weight) @ x).clamp(-limit, limit)
    return w64(expert.w2.weight) @ (a * torch.sigmoid(a) * b)


def moe(ffn, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """MoE output ``[N, H]`` (fp64), token by token."""
    gate = ffn.gate
    lim = ffn.shared_experts.swiglu_limit
    outs = []
    for t in range(xs.shape[0]):
        x = xs[t].to(D64)
        scores = torch.sqrt(torch.log1p(torch.exp(w64(gate.weight) @ x)))
        if gate.hash:
            experts = [int(e) for e in gate.tid2eid[ids[t]]]
        else:
            biased = scores + w64(gate.bias)
            experts = sorted(range(len(scores)), key=lambda e: -float(biased[e]))[: gate.topk]
        total = sum(float(scores[e]) for e in experts)
        out = _expert(ffn.shared_experts, x, lim)
        for e in experts:
            out = out + float(scores[e]) / max(total, 1e-20) * gate.route_scale * _expert(ffn.experts[e], x, lim)
        outs.append(out)
    return torch.stack(outs)


def mhc_coeffs(hrow: torch.Tensor, fn, scale, base, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pre [m], post [m], comb [m, m]`` of one token's stream ``hrow [m, H]``."""
    m = hrow.shape[0]
    flat = hrow.reshape(-1).to(D64)
    mix = w64(fn) @ rmsnorm(flat, None, cfg.rms_norm_eps)
    sc, bs = w64(scale), w64(base)
    pre = torch.sigmoid(mix[:m] * sc[0] + bs[:m]) + cfg.hc_eps
    post = 2.0 * torch.sigmoid(mix[m:2 * m] * sc[1] + bs[m:2 * m])
    logits = mix[2 * m:].view(m, m) * sc[2] + bs[2 * m:].view(m, m)
    comb = torch.stack([torch.softmax(logits[i], 0) for i in range(m)]) + cfg.hc_eps
    for it in range(cfg.hc_sinkhorn_iters):
        if it > 0:
            comb = torch.stack([comb[i] / (comb[i].sum() + cfg.hc_eps) for i in range(m)])
        comb = torch.stack([comb[:, j] / (comb[:, j].sum() + cfg.hc_eps) for j in range(m)], dim=1)
    return pre, post, comb


def layer(lay, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One decoder layer on the stream ``h [N, m, H]`` (fp64 in, fp64 out)."""
    cfg = lay.attn.config
    eps = cfg.rms_norm_eps
    for which in ("attn", "ffn"):
        fn, sc, bs = (getattr(lay, f"hc_{which}_{k}") for k in ("fn", "scale", "base"))
        coeffs = [mhc_coeffs(h[t], fn, sc, bs, cfg) for t in range(h.shape[0])]
        xs = torch.stack([(pre[:, None] * h[t]).sum(0) for t, (pre, _, _) in enumerate(coeffs)])
        if which == "attn":
            ys = attention(lay.attn, torch.stack([rmsnorm(x, lay.attn_norm.weight, eps) for x in xs]))
        else:
            ys = moe(lay.ffn, torch.stack([rmsnorm(x, lay.ffn_norm.weight, eps) for x in xs]), ids)
        new = torch.empty_like(h)
        for t, (_, post, comb) in enumerate(coeffs):
            for j in range(h.shape[1]):
                new[t, j] = post[j] * ys[t] + sum(comb[i, j] * h[t, i] for i in range(h.shape[1]))
        h = new
    return h


def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, vocab]`` (fp64) of a prefill of ``ids`` from position 0."""
    cfg = model.config
    h = w64(model.embed.weight)[ids][:, None, :].repeat(1, cfg.hc_mult, 1)
    for lay in model.layers:
        h = layer(lay, h, ids)
    outs = []
    for t in range(h.shape[0]):
        mix = w64(model.hc_head_fn) @ rmsnorm(h[t].reshape(-1), None, cfg.rms_norm_eps)
        pre = torch.sigmoid(mix * w64(model.hc_head_scale) + w64(model.hc_head_base)) + cfg.hc_eps
        x = rmsnorm((pre[:, None] * h[t]).sum(0), model.norm.weight, cfg.rms_norm_eps)
        outs.append(w64(model.head.weight) @ x)
    return torch.stack(outs)
