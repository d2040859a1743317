"""CUDA-oriented DeepSeek-V4 forward: the oracle's math written the way an NVIDIA serving path writes it.

Same parameters (a ``DeepseekV4Model``) and cache objects (``cache.py``) as the oracle, but with every
CUDA-only construct of the reference inventory (section 5) in the code path:
aux streams + events with a fork/join helper (wq_a || wkv, compressor || indexer), clamped SwiGLU through
``torch.ops._C.silu_and_mul_with_clamp`` into ``torch.empty`` buffers, fused mHC ops
(``dsv4_cuda::mhc_pre / mhc_fused_post_pre / mhc_post / hc_head``) with the deferred post (layer k's
ffn post fused with layer k+1's attn pre), the FlashMLA-like ``get_mla_metadata`` + ``sparse_decode`` for
decode, a hard-coded ``device="cuda"`` arange in the indexer mask, and PDL Triton launchers for the
compressor state save and the inverse rope. Prefill attention is dense masked torch (as the oracle).
The MoE computes every expert on every token with zero weight where unrouted (no data-dependent shapes,
so a whole forward is one Dynamo graph).

Two entry points over the same parameters:

* ``prefill`` / ``decode``: the oracle's Python caches (``cache.py``: Python-int lengths, growing tensors,
  branches on lengths). Exact, but Dynamo specialises on every length: it recompiles on almost every
  decode step and for every new prefill length / batch size.
* ``forward_static(input_ids [T], positions [T], slots [T], cache: StaticCache, decode)`` (or
  ``prefill_static`` / ``decode_static``): tensor-only, on the fixed-capacity ``StaticCache``
  (``static_cache.py``: per-layer window ring + compressed entries in one ``[S + 1, W + E, D]`` buffer,
  compressor pending-row rings, indexer keys, ``lengths [S + 1]``; slot ``S`` is a trash row). Nothing
  branches on a value: every token computes the compressed entry its position would complete and writes it
  where ``(p + 1) % r == 0`` (else to the trash slot); ring writes of tokens that would collide are
  redirected to the trash slot; window / entry candidates are masks (prefill: dense masked attention over
  ``[slot's ring rows, its entries, the new keys]``) or int32 row indices into the flat cache with -1
  (decode: ``get_mla_metadata`` + ``sparse_decode`` straight out of the cache); the indexer sorts all
  ``E`` capacity rows (stable, masked ones last -> -1). Prefill = T tokens of one slot (contiguous
  positions from its length, so chunked prefill works); decode = one token per distinct slot.
  The only Python-level specialisations are ``decode`` (two graphs) and the model/cache structure;
  mark dim 0 of the ``[T]`` inputs with ``static_cache.mark_tokens_dynamic`` (unbacked) and one graph
  per mode serves every position, batch size and prefill length, T = 1 included.
  Cache writes are collected during the forward (reads in the same call see them through functional
  ``index_put``) and applied in place at its end, after the last stream event: Dynamo refuses to record
  an event after a graph-input mutation (it applies those in an epilogue). With Inductor the functional
  copies are re-inplaced; eagerly they cost one copy of a layer's buffers per write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import dsv4_compile.frontend.ops.activation  # noqa: F401 - defines _C::silu_and_mul_with_clamp if missing

from . import cuda_ops  # noqa: F401 - defines the dsv4_cuda ops
from .cache import CompressorState, LayerCache, SequenceCache, new_cache
from .modeling import Attention, Compressor, DeepseekV4Model, Expert, Indexer, MoE
from .oracle import index_scores, rms_norm, top_entries
from .rope import layer_inv_freq, rope_cos_sin, rope_last
from .static_cache import StaticCache
from .triton_kernels import inv_rope, save_partial_states

NUM_SM_PARTS = 8  # tile-scheduler parts (FlashMLA derives it from the SM count)


def compress(comp: Compressor, x: torch.Tensor, start_pos: int, state: CompressorState,
             inv_freq: torch.Tensor) -> torch.Tensor:
    """The oracle's ``compressor_forward`` (same math and state layout); the pending rows are saved
    into new state buffers by the ``save_partial_states`` Triton launcher."""
    r, coff, d = comp.ratio, comp.coff, comp.head_dim
    n = x.shape[0]
    pos = torch.arange(start_pos, start_pos + n, device=x.device)
    xf = x.float()
    rows_kv = torch.cat([state.kv, xf @ comp.wkv.weight.float().T])
    rows_sc = torch.cat([state.score, xf @ comp.wgate.weight.float().T + comp.ape.float()[pos % r]])
    first = start_pos - state.kv.shape[0]
    c0, c1 = start_pos // r, (start_pos + n) // r
    new = x.new_empty(0, d)
    if c1 > c0:
        p0 = (c0 - (coff - 1)) * r
        pad = first - p0
        pk = torch.cat([rows_kv.new_zeros(pad, coff * d), rows_kv])
        ps = torch.cat([rows_sc.new_full((pad, coff * d), float("-inf")), rows_sc])
        nb = c1 - c0 + coff - 1
        blk_kv, blk_sc = pk[: nb * r].view(nb, r, coff * d), ps[: nb * r].view(nb, r, coff * d)
        win_kv, win_sc = blk_kv[coff - 1:, :, (coff - 1) * d:], blk_sc[coff - 1:, :, (coff - 1) * d:]
        if coff == 2:
            win_kv = torch.cat([blk_kv[:-1, :, :d], win_kv], dim=1)
            win_sc = torch.cat([blk_sc[:-1, :, :d], win_sc], dim=1)
        entry = rms_norm((win_kv * win_sc.softmax(dim=1)).sum(1), comp.norm.weight, comp.norm.eps)
        cos, sin = rope_cos_sin(torch.arange(c0, c1, device=x.device) * r, inv_freq)
        new = rope_last(entry, cos, sin).to(x.dtype)
        state.entries = torch.cat([state.entries, new])
    keep = max(0, (c1 - (coff - 1)) * r) - first
    state.kv, state.score = save_partial_states(rows_kv[keep:], rows_sc[keep:])
    return new


def indexer_topk(indexer: Indexer, x: torch.Tensor, qr: torch.Tensor, start_pos: int, state: CompressorState,
                 inv_freq: torch.Tensor) -> torch.Tensor:
    """The oracle's ``indexer_topk`` (stable descending sort, -1 = none), with the causal mask built
    from a hard-coded ``torch.arange(0, n, device="cuda")``."""
    compress(indexer.compressor, x, start_pos, state, inv_freq)
    pos = torch.arange(start_pos, start_pos + x.shape[0], device=x.device)
    logits = index_scores(indexer, x, qr, pos, inv_freq, state.entries)
    causal = torch.arange(0, state.entries.shape[0], device="cuda")[None, :] < ((pos + 1) // 4)[:, None]
    return top_entries(logits.masked_fill(~causal, float("-inf")), indexer.topk)


class CudaDeepseekV4(nn.Module):
    """CUDA-oriented forward over the parameters of ``model``; ``prefill`` / ``decode`` mirror
    ``oracle_prefill`` / ``oracle_decode`` (same caches, same logits up to rounding)."""

    def __init__(self, model: DeepseekV4Model, num_sm_parts: int = NUM_SM_PARTS) -> None:
        super().__init__()
        self.model = model
        self.num_sm_parts = num_sm_parts
        self.aux_streams = [torch.cuda.Stream() for _ in range(3)]
        # Per layer: (fork, join) for the input projections, (fork, join) for compressor || indexer.
        self.events = [[torch.cuda.Event() for _ in range(4)] for _ in model.layers]

    # ------------------------------------------------------------------------- streams
    def fork_join(self, fn0: Callable[[], object], fn1: Callable[[], object], aux: int,
                  fork: torch.cuda.Event, join: torch.cuda.Event) -> tuple[object, object]:
        """Run ``fn0`` on the current stream and ``fn1`` on aux stream ``aux`` concurrently; join."""
        stream = self.aux_streams[aux]
        fork.record()
        r0 = fn0()
        with torch.cuda.stream(stream):
            fork.wait(stream)
            r1 = fn1()
            join.record(stream)
        join.wait()
        return r0, r1

    # ------------------------------------------------------------------------- attention
    def _compressed(self, i: int, attn: Attention, x: torch.Tensor, qr: torch.Tensor,
                    caches: Sequence[LayerCache], seq_lens: Sequence[int], inv_freq: torch.Tensor,
                    ) -> list[torch.Tensor | None]:
        """Update the compressor (current stream) and indexer (aux stream); per-sequence top-k indices
        (ratio-4 layers) or None."""
        starts = [c.length for c in caches]
        offs = [sum(seq_lens[:b]) for b in range(len(seq_lens))]

        def run_compressor() -> None:
            for c, s, o, n in zip(caches, starts, offs, seq_lens, strict=True):
                compress(attn.compressor, x[o:o + n], s, c.compressor, inv_freq)

        def run_indexer() -> list[torch.Tensor]:
            return [indexer_topk(attn.indexer, x[o:o + n], qr[o:o + n], s, c.indexer, inv_freq)
                    for c, s, o, n in zip(caches, starts, offs, seq_lens, strict=True)]

        if attn.indexer is None:
            run_compressor()
            return [None] * len(caches)
        ev = self.events[i]
        _, idx = self.fork_join(run_compressor, run_indexer, 1, ev[2], ev[3])
        return idx

    def _prefill_attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, cache: LayerCache,
                        idx: torch.Tensor | None) -> torch.Tensor:
        """Dense masked attention with sink of one sequence's ``n`` new tokens -> ``[n, heads, D]``."""
        start, n, dev = cache.length, q.shape[0], q.device
        pos = torch.arange(start, start + n, device=dev)
        keys = torch.cat([cache.window, k])
        kpos = torch.arange(start - cache.window.shape[0], start + n, device=dev)
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - attn.window)
        r = attn.compress_ratio
        if r:
            entries = cache.compressor.entries
            nc = entries.shape[0]
            if idx is not None:
                idx = torch.where(idx < 0, nc, idx)
                cmask = torch.zeros(n, nc + 1, dtype=torch.bool, device=dev).scatter_(1, idx, True)[:, :nc]
            else:
                cmask = torch.arange(nc, device=dev)[None, :] < ((pos + 1) // r)[:, None]
            keys, mask = torch.cat([keys, entries]), torch.cat([mask, cmask], dim=1)
        s = torch.einsum("thd,kd->thk", q.float(), keys.float()) * attn.head_dim ** -0.5
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        sink = attn.attn_sink.float()[None, :, None].expand(n, -1, 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
        return torch.einsum("thk,kd->thd", p, keys.float()).to(q.dtype)

    def _decode_attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, caches: Sequence[LayerCache],
                       idx: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """One token per sequence: gather candidate rows (window + compressed entries) into one kv
        buffer with int32 indices (-1 = missing), schedule with ``get_mla_metadata``, attend with
        ``sparse_decode``. ``q [B, heads, D]`` -> ``[B, heads, D]``."""
        parts, rows, base = [], [], 0
        for b, cache in enumerate(caches):
            win = torch.cat([cache.window, k[b:b + 1]])[-attn.window:]
            cand = [torch.arange(base, base + win.shape[0], device=q.device)]
            parts.append(win)
            base += win.shape[0]
            if attn.compress_ratio:
                entries = cache.compressor.entries  # all causal: the compressor is at position p + 1
                parts.append(entries)
                if idx[b] is None:
                    cand.append(torch.arange(base, base + entries.shape[0], device=q.device))
                else:
                    sel = idx[b][0]
                    cand.append(torch.where(sel >= 0, sel + base, -1))
                base += entries.shape[0]
            rows.append(torch.cat(cand))
        width = max(r.shape[0] for r in rows)
        indices = torch.stack([F.pad(r, (0, width - r.shape[0]), value=-1) for r in rows]).to(torch.int32)
        kv = torch.cat(parts)
        meta = num_splits = None
        if q.shape[0] > 0:  # the scheduler is skipped when there are no decode tokens
            lens = (indices >= 0).sum(-1).to(torch.int32)
            meta, num_splits = torch.ops.dsv4_cuda.get_mla_metadata(lens, attn.n_heads, width, self.num_sm_parts)
        return torch.ops.dsv4_cuda.sparse_decode(
            q, kv, indices, attn.attn_sink, meta, num_splits, attn.head_dim ** -0.5
        )

    def attention(self, i: int, attn: Attention, x: torch.Tensor, caches: Sequence[LayerCache],
                  seq_lens: Sequence[int]) -> torch.Tensor:
        """Attention sub-layer on normed ``x [T, H]`` (the oracle's ``attention``); advances the caches."""
        t, nh, d, eps = x.shape[0], attn.n_heads, attn.head_dim, attn.eps
        inv_freq = layer_inv_freq(attn.config, attn.compress_ratio).to(x.device)
        pos = torch.cat([torch.arange(c.length, c.length + n, device=x.device)
                         for c, n in zip(caches, seq_lens, strict=True)])
        cos, sin = rope_cos_sin(pos, inv_freq)
        ev = self.events[i]
        qr, kv = self.fork_join(
            lambda: rms_norm(F.linear(x, attn.wq_a.weight), attn.q_norm.weight, eps),
            lambda: rms_norm(F.linear(x, attn.wkv.weight), attn.kv_norm.weight, eps),
            0, ev[0], ev[1],
        )
        q = rope_last(rms_norm(F.linear(qr, attn.wq_b.weight).view(t, nh, d), None, eps), cos, sin)
        k = rope_last(kv, cos, sin)
        idx = self._compressed(i, attn, x, qr, caches, seq_lens, inv_freq) if attn.compress_ratio else \
            [None] * len(caches)
        if all(n == 1 for n in seq_lens):
            o = self._decode_attend(attn, q, k, caches, idx)
        else:
            outs, off = [], 0
            for cache, n, ix in zip(caches, seq_lens, idx, strict=True):
                outs.append(self._prefill_attend(attn, q[off:off + n], k[off:off + n], cache, ix))
                off += n
            o = torch.cat(outs)
        off = 0
        for cache, n in zip(caches, seq_lens, strict=True):
            cache.window = torch.cat([cache.window, k[off:off + n]])[-attn.window:].clone()
            cache.length += n
            off += n
        o = inv_rope(o, cos, sin)
        g = attn.n_groups
        wo_a = attn.wo_a.weight.view(g, attn.o_lora_rank, -1)
        o = torch.einsum("tgd,gld->tgl", o.reshape(t, g, -1), wo_a).reshape(t, -1)
        return F.linear(o, attn.wo_b.weight)

    # ------------------------------------------------------------------------- MoE
    @staticmethod
    def expert(expert: Expert, x: torch.Tensor) -> torch.Tensor:
        """``w2(silu_and_mul_with_clamp([w1 x | w3 x]))`` through the fused ``_C`` op."""
        h = torch.cat([F.linear(x, expert.w1.weight), F.linear(x, expert.w3.weight)], dim=-1)
        out = torch.empty(x.shape[0], h.shape[-1] // 2, dtype=x.dtype, device=x.device)
        torch.ops._C.silu_and_mul_with_clamp(out, h, expert.swiglu_limit)
        return F.linear(out, expert.w2.weight)

    def moe(self, ffn: MoE, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The oracle's ``moe``: routing weights scattered to ``[T, E]``, every expert run densely."""
        gate = ffn.gate
        scores = torch.sqrt(F.softplus(x.float() @ gate.weight.float().T))
        if gate.hash:
            ids = gate.tid2eid[input_ids].long()
        else:
            ids = (scores + gate.bias.float()).topk(gate.topk, dim=-1).indices
        w = scores.gather(1, ids)
        if gate.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        dense = torch.zeros_like(scores).scatter(1, ids, w * gate.route_scale)
        out = self.expert(ffn.shared_experts, x).float()
        for e, expert in enumerate(ffn.experts):
            out = out + self.expert(expert, x).float() * dense[:, e:e + 1]
        return out.to(x.dtype)

    # ------------------------------------------------------------------------- model
    def forward(self, input_ids: torch.Tensor, caches: Sequence[SequenceCache],
                seq_lens: Sequence[int]) -> torch.Tensor:
        """Logits ``[T, vocab]`` fp32 of the concatenated new tokens (the oracle's ``model_forward``)."""
        logits = self.decoder(input_ids, lambda i, attn, x: self.attention(i, attn, x, [c.layers[i] for c in caches],
                                                                            seq_lens))
        for c, n in zip(caches, seq_lens, strict=True):
            c.length += n
        return logits

    def decoder(self, input_ids: torch.Tensor,
                attend: Callable[[int, Attention, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``embed -> layers -> hc_head -> norm -> head``, the CUDA path's structure: fused mHC ops, each layer's
        ffn post fused with the next layer's attention pre (deferred post). ``attend(i, attn, x)`` is layer
        ``i``'s attention on its normed input. Logits ``[T, vocab]`` fp32."""
        model, cfg = self.model, self.model.config
        kw = (cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters)
        ops = torch.ops.dsv4_cuda
        x = F.embedding(input_ids, model.embed.weight)
        h = x[:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()
        layers = list(model.layers)
        first = layers[0]
        x, post, comb = ops.mhc_pre(h, first.hc_attn_fn, first.hc_attn_scale, first.hc_attn_base, *kw)
        for i, layer in enumerate(layers):
            x = attend(i, layer.attn, rms_norm(x, layer.attn_norm.weight, layer.attn_norm.eps))
            h, x, post, comb = ops.mhc_fused_post_pre(
                x, h, post, comb, layer.hc_ffn_fn, layer.hc_ffn_scale, layer.hc_ffn_base, *kw)
            x = self.moe(layer.ffn, rms_norm(x, layer.ffn_norm.weight, layer.ffn_norm.eps), input_ids)
            if i + 1 < len(layers):  # deferred post: fused with the next layer's attention pre
                nxt = layers[i + 1]
                h, x, post, comb = ops.mhc_fused_post_pre(
                    x, h, post, comb, nxt.hc_attn_fn, nxt.hc_attn_scale, nxt.hc_attn_base, *kw)
            else:
                h = ops.mhc_post(x, h, post, comb)
        x = ops.hc_head(h, model.hc_head_fn, model.hc_head_scale, model.hc_head_base, kw[0], kw[1])
        x = rms_norm(x, model.norm.weight, model.norm.eps)
        return F.linear(x, model.head.weight).float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: SequenceCache | None = None
                ) -> tuple[torch.Tensor, SequenceCache]:
        """Like ``oracle_prefill``: ``(logits [N, vocab] fp32, cache)``."""
        cache = new_cache(self.model) if cache is None else cache
        return self.forward(input_ids, [cache], [input_ids.shape[0]]), cache

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, caches: Sequence[SequenceCache]) -> torch.Tensor:
        """Like ``oracle_decode``: one token per cache -> logits ``[B, vocab]`` fp32."""
        return self.forward(input_ids, caches, [1] * len(caches))

    # ------------------------------------------------------------------------- static (tensorized) path
    def _static_prefill_attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, b: StaticBatch,
                               kv_buf: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Dense masked attention of one slot's ``n`` new tokens over ``[slot's W ring rows, its E entry
        rows, the n new keys]`` (window rows before this call's write; entries after it)."""
        n, dev, w = q.shape[0], q.device, attn.window
        e = kv_buf.shape[1] - w
        p = b.pos[:, None]
        last_old = b.start[:, None] - 1  # ring row j holds the latest position < start that is = j mod W
        wp = last_old - (last_old - torch.arange(w, device=dev)[None, :]).remainder(w)
        masks = [(wp >= 0) & (wp > p - w)]
        r = attn.compress_ratio
        if r:
            if idx is not None:
                idx = torch.where(idx < 0, e, idx)
                masks.append(torch.zeros(n, e + 1, dtype=torch.bool, device=dev).scatter_(1, idx, True)[:, :e])
            else:
                masks.append(torch.arange(e, device=dev)[None, :] < ((b.pos + 1) // r)[:, None])
        masks.append((b.pos[None, :] <= p) & (b.pos[None, :] > p - w) & (b.slots[None, :] == b.slots[:, None]))
        keys = torch.cat([kv_buf[b.slots[:1]][0], k])
        mask = torch.cat(masks, dim=1)
        s = torch.einsum("thd,kd->thk", q.float(), keys.float()) * attn.head_dim ** -0.5
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        sink = attn.attn_sink.float()[None, :, None].expand(n, -1, 1)
        pr = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
        return torch.einsum("thk,kd->thd", pr, keys.float()).to(q.dtype)

    def _static_decode_attend(self, attn: Attention, q: torch.Tensor, b: StaticBatch, kv_buf: torch.Tensor,
                              idx: torch.Tensor | None) -> torch.Tensor:
        """One token per slot, after its key was written to the ring: int32 candidate rows of the flat
        cache ``kv_buf.view(-1, D)`` (window ring rows, then entries; -1 = missing), scheduled by
        ``get_mla_metadata`` and attended by ``sparse_decode`` straight out of the cache."""
        dev, w, rows = q.device, attn.window, kv_buf.shape[1]
        e = rows - w
        p = b.pos[:, None]
        base = b.slots[:, None] * rows
        j = torch.arange(w, device=dev)[None, :]
        cand = [torch.where(p - (p - j).remainder(w) >= 0, base + j, -1)]  # ring row j holds p - (p-j) % W
        r = attn.compress_ratio
        if r:
            if idx is not None:
                cand.append(torch.where(idx >= 0, base + w + idx, -1))
            else:
                c = torch.arange(e, device=dev)[None, :]
                cand.append(torch.where(c < (p + 1) // r, base + w + c, -1))
        indices = torch.cat(cand, dim=1).to(torch.int32)
        lens = (indices >= 0).sum(-1).to(torch.int32)
        meta, num_splits = torch.ops.dsv4_cuda.get_mla_metadata(lens, attn.n_heads, indices.shape[1],
                                                                self.num_sm_parts)
        return torch.ops.dsv4_cuda.sparse_decode(
            q, kv_buf.view(-1, kv_buf.shape[-1]), indices, attn.attn_sink, meta, num_splits, attn.head_dim ** -0.5
        )

    def attention_static(self, i: int, attn: Attention, x: torch.Tensor, b: StaticBatch,
                         cache: StaticCache) -> torch.Tensor:
        """``attention`` on the fixed-capacity cache (updated in place with tensor ops only)."""
        t, nh, d, eps = x.shape[0], attn.n_heads, attn.head_dim, attn.eps
        inv_freq = layer_inv_freq(attn.config, attn.compress_ratio).to(x.device)
        cos, sin = rope_cos_sin(b.pos, inv_freq)
        ev = self.events[i]
        qr, kv = self.fork_join(
            lambda: rms_norm(F.linear(x, attn.wq_a.weight), attn.q_norm.weight, eps),
            lambda: rms_norm(F.linear(x, attn.wkv.weight), attn.kv_norm.weight, eps),
            0, ev[0], ev[1],
        )
        q = rope_last(rms_norm(F.linear(qr, attn.wq_b.weight).view(t, nh, d), None, eps), cos, sin)
        k = rope_last(kv, cos, sin)
        kv_buf, idx = cache.kv[i], None
        if attn.compressor is not None:
            def run_compressor() -> torch.Tensor:
                return compress_static(attn.compressor, x, b, cache.comp_kv[i], cache.comp_score[i], kv_buf,
                                       attn.window, inv_freq)

            if attn.indexer is None:
                kv_buf = run_compressor()
            else:
                kv_buf, idx = self.fork_join(
                    run_compressor,
                    lambda: indexer_topk_static(attn.indexer, x, qr, b, cache.idx_kv[i], cache.idx_score[i],
                                                cache.index_keys[i], inv_freq),
                    1, ev[2], ev[3])
        ring = (_masked_dest(b, attn.window), b.pos % attn.window)
        if b.decode:
            kv_buf = _write(b, cache.kv[i], ring, k, kv_buf)  # row p % W held p - W, which just left the window
            o = self._static_decode_attend(attn, q, b, kv_buf, idx)
        else:
            o = self._static_prefill_attend(attn, q, k, b, kv_buf, idx)
            b.writes.append((cache.kv[i], ring, k))
        o = inv_rope(o, cos, sin)
        g = attn.n_groups
        wo_a = attn.wo_a.weight.view(g, attn.o_lora_rank, -1)
        o = torch.einsum("tgd,gld->tgl", o.reshape(t, g, -1), wo_a).reshape(t, -1)
        return F.linear(o, attn.wo_b.weight)

    @torch.no_grad()
    def forward_static(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache: StaticCache, decode: bool) -> torch.Tensor:
        """Tensor-only forward: token t (``input_ids [T]``) at ``positions[t]`` of slot ``slots[t]``;
        ``decode=False``: T tokens of ONE slot, contiguous positions from its length (prefill / chunked
        prefill); ``decode=True``: one token per distinct slot. Updates ``cache`` in place (no Python
        branch on any value) and returns logits ``[T, vocab]`` fp32."""
        torch._check(input_ids.shape[0] >= 1)  # at least one token: lets the compiler size slots[:1] as 1
        new_len = cache.lengths.scatter_reduce(0, slots, positions + 1, "amax")
        b = StaticBatch(positions, slots, cache.lengths[slots], new_len[slots] - 1, cache.trash, decode, [])
        logits = self.decoder(input_ids, lambda i, attn, x: self.attention_static(i, attn, x, b, cache))
        for buf, index, values in b.writes:  # the only in-place cache updates, after every stream event
            buf.index_put_(index, values)
        cache.lengths.copy_(new_len)
        return logits

    def prefill_static(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       cache: StaticCache) -> torch.Tensor:
        """``forward_static(..., decode=False)``: one slot's next tokens."""
        return self.forward_static(input_ids, positions, slots, cache, False)

    def decode_static(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      cache: StaticCache) -> torch.Tensor:
        """``forward_static(..., decode=True)``: one token per slot."""
        return self.forward_static(input_ids, positions, slots, cache, True)


# ============================================================================= static (tensorized) path
class StaticBatch(NamedTuple):
    """Per-token bookkeeping of one ``forward_static`` call (all ``[T]`` int64 tensors)."""

    pos: torch.Tensor  # position of each token
    slots: torch.Tensor  # slot of each token
    start: torch.Tensor  # length of the token's slot before this call
    last: torch.Tensor  # last position of the token's slot after this call
    trash: int  # the cache's trash slot
    decode: bool
    writes: list  # deferred in-place cache writes (buffer, indices, values), applied at the end


def _write(b: StaticBatch, buf: torch.Tensor, index: tuple[torch.Tensor, ...], values: torch.Tensor,
           current: torch.Tensor | None = None) -> torch.Tensor:
    """Functional ``current.index_put(index, values)`` (``current``: ``buf`` with this call's earlier
    writes) for the reads of this call; the in-place write into the cache tensor ``buf`` is deferred to
    the end of ``forward_static`` (after the last stream event: Dynamo rejects an event recorded after
    a graph-input mutation)."""
    b.writes.append((buf, index, values))
    return (buf if current is None else current).index_put(index, values)


def _masked_dest(b: StaticBatch, keep_last: int) -> torch.Tensor:
    """Destination slot of a ring write: the token's slot if it is among its slot's last ``keep_last``
    positions of this call, else the trash slot (earlier tokens would collide in the ring)."""
    return torch.where(b.pos > b.last - keep_last, b.slots, torch.full_like(b.slots, b.trash))


def compress_static(comp: Compressor, x: torch.Tensor, b: StaticBatch, ring_kv: torch.Tensor,
                    ring_sc: torch.Tensor, entries: torch.Tensor, base: int, inv_freq: torch.Tensor
                    ) -> torch.Tensor:
    """The oracle's ``compressor_forward`` on a fixed-capacity state: computes, for EVERY token, the entry
    its position would complete, and writes it to ``entries[slot, base + p // r]`` only where
    ``(p + 1) % r == 0`` (elsewhere to the trash slot). The window of the ``R = coff * r`` positions
    ending at ``p`` is gathered from ``cat(ring, new rows)`` (tokens of one slot are contiguous and in
    order); then the new rows go through ``save_partial_states`` into the ring (rows ``p % R``).
    Returns ``entries`` with this call's entries written (the cache itself is written at the end)."""
    r, coff, d = comp.ratio, comp.coff, comp.head_dim
    big_r, width = coff * r, coff * d
    n, dev = x.shape[0], x.device
    xf = x.float()
    kv = xf @ comp.wkv.weight.float().T
    sc = xf @ comp.wgate.weight.float().T + comp.ape.float()[b.pos % r]
    k = torch.arange(big_r, device=dev)
    q = b.pos[:, None] - (big_r - 1) + k[None, :]  # [T, R] positions read by token t's entry
    ring_rows = ring_kv.shape[0] * big_r
    src_new = ring_rows + torch.arange(n, device=dev)[:, None] - (big_r - 1) + k[None, :]
    src_ring = b.slots[:, None] * big_r + q.remainder(big_r)
    src = torch.where(q >= b.start[:, None], src_new, src_ring)
    valid = (q >= 0)[..., None]
    win_kv = torch.cat([ring_kv.reshape(-1, width), kv])[src].masked_fill(~valid, 0.0)
    win_sc = torch.cat([ring_sc.reshape(-1, width), sc])[src].masked_fill(~valid, float("-inf"))
    if coff == 2:  # older r positions: channels [:d]; newer r: channels [d:]
        win_kv = torch.cat([win_kv[:, :r, :d], win_kv[:, r:, d:]], dim=1)
        win_sc = torch.cat([win_sc[:, :r, :d], win_sc[:, r:, d:]], dim=1)
    entry = rms_norm((win_kv * win_sc.softmax(dim=1)).sum(1), comp.norm.weight, comp.norm.eps)
    cos, sin = rope_cos_sin(torch.div(b.pos, r, rounding_mode="floor") * r, inv_freq)
    entry = rope_last(entry, cos, sin).to(entries.dtype)
    done = (b.pos + 1) % r == 0
    trash = torch.full_like(b.slots, b.trash)
    entries = _write(b, entries, (torch.where(done, b.slots, trash),
                                  torch.where(done, base + torch.div(b.pos, r, rounding_mode="floor"), base)), entry)
    kv, sc = save_partial_states(kv, sc)
    dest, row = _masked_dest(b, big_r), b.pos % big_r
    b.writes.append((ring_kv, (dest, row), kv))
    b.writes.append((ring_sc, (dest, row), sc))
    return entries


def indexer_topk_static(indexer: Indexer, x: torch.Tensor, qr: torch.Tensor, b: StaticBatch,
                        ring_kv: torch.Tensor, ring_sc: torch.Tensor, keys_buf: torch.Tensor,
                        inv_freq: torch.Tensor) -> torch.Tensor:
    """The oracle's ``indexer_topk`` over the slot's fixed-capacity key buffer ``[S + 1, E, d]``: logits
    of entries ``j >= (p + 1) // 4`` (not yet written, or stale) are masked (hard-coded ``device="cuda"``
    arange), then a stable descending sort over all ``E`` capacity rows (ties -> lower index, masked
    ones last -> -1)."""
    keys_buf = compress_static(indexer.compressor, x, b, ring_kv, ring_sc, keys_buf, 0, inv_freq)
    n, nh, d, k = x.shape[0], indexer.n_heads, indexer.head_dim, indexer.topk
    e = keys_buf.shape[1]
    cos, sin = rope_cos_sin(b.pos, inv_freq)
    qi = rope_last(F.linear(qr, indexer.wq_b.weight).view(n, nh, d), cos, sin).float()
    w = F.linear(x, indexer.weights_proj.weight).float() * (d ** -0.5 * nh ** -0.5)
    if b.decode:  # one token per slot: each query reads its own slot's keys
        scores = torch.einsum("thd,tcd->thc", qi, keys_buf[b.slots].float())
    else:  # prefill: every token belongs to the slot of the first one
        scores = torch.einsum("thd,cd->thc", qi, keys_buf[b.slots[:1]][0].float())
    logits = torch.einsum("th,thc->tc", w, scores.relu())
    causal = torch.arange(0, e, device="cuda")[None, :] < ((b.pos + 1) // 4)[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    kk = min(k, e)
    vals, idx = logits.sort(dim=-1, descending=True, stable=True)
    idx = idx[:, :kk].masked_fill(vals[:, :kk] == float("-inf"), -1)
    return torch.cat([idx, idx.new_full((n, k - kk), -1)], dim=1)
