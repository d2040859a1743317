"""The DeepSeek-V4 native oracle against a slow per-token fp64 reference, and its cache semantics.

Tolerances: the comparisons with the reference run the oracle on an fp32 model, so the only
differences are fp32 vs fp64 rounding (observed <= 3e-6 on O(1) outputs through the whole model):
atol/rtol 1e-4. Discrete choices (window, indexer top-k with ties to the older entry, expert top-k)
then agree exactly. In bf16 a single flipped expert or top-k choice changes outputs by O(1), so bf16
is only compared for attention on an input where choices agree (2e-2 ~ a few bf16 ulps of O(1)
values, accumulated over two projections), and prefill-vs-decode in bf16 uses 2e-2 as well.
Prefill-vs-decode in fp32 differs only by matmul blocking: 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dsv4_compile.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4Model,
    new_cache,
    oracle,
    oracle_decode,
    oracle_prefill,
)
from dsv4_compile.models.deepseek_v4.cache import CompressorState
from dsv4_compile.models.deepseek_v4.rope import layer_inv_freq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dsv4_slow_reference as ref

TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
CFG = DeepseekV4Config.tiny()
N = 41  # > sliding_window 8, 10 ratio-4 entries (> index_topk 4), 2 heavy (ratio 16) entries


@pytest.fixture(scope="module")
def m32() -> DeepseekV4Model:
    return DeepseekV4Model(CFG, seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def m16() -> DeepseekV4Model:
    return DeepseekV4Model(CFG, seed=0, dtype=torch.bfloat16)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(a.double(), b.double(), **tol)


# ----------------------------------------------------------------------------- vs slow reference
@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_attention_matches_reference(m32: DeepseekV4Model, layer: int) -> None:
    attn = m32.layers[layer].attn
    x = _randn(N, CFG.hidden_size, seed=layer)
    with torch.no_grad():
        out = oracle.attention(attn, x, [new_cache(m32).layers[layer]], [N])
    _close(out, ref.attention(attn, x), TOL)


@pytest.mark.parametrize("layer", [0, 2])
def test_attention_bf16_close_to_reference(m16: DeepseekV4Model, layer: int) -> None:
    attn = m16.layers[layer].attn
    x = _randn(N, CFG.hidden_size, seed=layer, dtype=torch.bfloat16)
    with torch.no_grad():
        out = oracle.attention(attn, x, [new_cache(m16).layers[layer]], [N])
    _close(out, ref.attention(attn, x), BF16_TOL)


def test_heavy_ratio_128_matches_reference() -> None:
    cfg = DeepseekV4Config.tiny(heavy_ratio=128)
    model = DeepseekV4Model(cfg, seed=1, dtype=torch.float32)
    attn, n = model.layers[2].attn, 140
    x = _randn(n, cfg.hidden_size, seed=5)
    lc = new_cache(model).layers[2]
    with torch.no_grad():
        out = oracle.attention(attn, x, [lc], [n])
    assert lc.compressor.entries.shape[0] == 1 and lc.compressor.kv.shape[0] == n - 128
    _close(out, ref.attention(attn, x), TOL)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("chunks", [[N], [1] * N, [3, 5, 1, 16, 7, 9]])
def test_compressor_matches_reference(m32: DeepseekV4Model, layer: int, chunks: list[int]) -> None:
    comp = m32.layers[layer].attn.compressor
    x = _randn(N, CFG.hidden_size, seed=7)
    inv_freq = layer_inv_freq(CFG, comp.ratio)
    state = CompressorState.empty(comp.coff * comp.head_dim, comp.head_dim, torch.float32, x.device)
    start = 0
    with torch.no_grad():
        for n in chunks:
            oracle.compressor_forward(comp, x[start:start + n], start, state, inv_freq)
            start += n
    expect = ref.compressed_entries(comp, x, ref.rope_freqs(CFG, comp.ratio), CFG.rms_norm_eps)
    assert state.entries.shape == (N // comp.ratio, comp.head_dim)
    _close(state.entries, expect, TOL)


def test_indexer_matches_reference(m32: DeepseekV4Model) -> None:
    attn = m32.layers[1].attn
    x = _randn(N, CFG.hidden_size, seed=3)
    qr = _randn(N, CFG.q_lora_rank, seed=4)
    state = new_cache(m32).layers[1].indexer
    with torch.no_grad():
        idx = oracle.indexer_topk(attn.indexer, x, qr, 0, state, layer_inv_freq(CFG, 4))
    expect = ref.indexer_choices(attn.indexer, x, qr.double(), ref.rope_freqs(CFG, 4), CFG.rms_norm_eps)
    assert idx.shape == (N, CFG.index_topk)
    for t in range(N):
        got = sorted(i for i in idx[t].tolist() if i >= 0)
        assert got == expect[t], t
        assert len(got) == min(CFG.index_topk, (t + 1) // 4)  # short contexts take every entry


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_decoder_layer_matches_reference(m32: DeepseekV4Model, layer: int) -> None:
    h = _randn(N, CFG.hc_mult, CFG.hidden_size, seed=11 + layer)
    ids = _ids(N, seed=layer)
    with torch.no_grad():
        out = oracle.decoder_layer(m32.layers[layer], h, ids, [new_cache(m32).layers[layer]], [N])
    _close(out, ref.layer(m32.layers[layer], h.double(), ids), TOL)


def test_model_logits_match_reference(m32: DeepseekV4Model) -> None:
    ids = _ids(N, seed=21)
    logits, cache = oracle_prefill(m32, ids)
    assert logits.shape == (N, CFG.vocab_size) and logits.dtype == torch.float32
    assert cache.length == N and all(lc.length == N for lc in cache.layers)
    _close(logits, ref.model_logits(m32, ids), TOL)


# ----------------------------------------------------------------------------- cache semantics
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 40])
def test_prefill_then_decode_equals_longer_prefill(m32: DeepseekV4Model, n: int) -> None:
    ids = _ids(n + 1, seed=n)
    full, _ = oracle_prefill(m32, ids)
    _, cache = oracle_prefill(m32, ids[:n])
    step = oracle_decode(m32, ids[n:], [cache])
    assert cache.length == n + 1
    _close(step[0], full[n], TOL)


@pytest.mark.parametrize("n", [8, 16, 33])
def test_prefill_then_decode_bf16(m16: DeepseekV4Model, n: int) -> None:
    ids = _ids(n + 1, seed=100 + n)
    full, _ = oracle_prefill(m16, ids)
    _, cache = oracle_prefill(m16, ids[:n])
    _close(oracle_decode(m16, ids[n:], [cache])[0], full[n], BF16_TOL)


def test_multi_sequence_decode_batch(m32: DeepseekV4Model) -> None:
    lens, steps = [5, 16, 33], 4  # crosses window (8), ratio-4 and ratio-16 boundaries while decoding
    seqs = [_ids(n + steps, seed=50 + i) for i, n in enumerate(lens)]
    caches = [oracle_prefill(m32, s[:n])[1] for s, n in zip(seqs, lens, strict=True)]
    fulls = [oracle_prefill(m32, s)[0] for s in seqs]
    for k in range(steps):
        tokens = torch.stack([s[n + k] for s, n in zip(seqs, lens, strict=True)])
        logits = oracle_decode(m32, tokens, caches)
        assert logits.shape == (len(lens), CFG.vocab_size)
        for b, n in enumerate(lens):
            _close(logits[b], fulls[b][n + k], TOL)


def test_chunked_prefill_equals_prefill(m32: DeepseekV4Model) -> None:
    ids = _ids(N, seed=77)
    full, _ = oracle_prefill(m32, ids)
    a, cache = oracle_prefill(m32, ids[:13])
    b, cache = oracle_prefill(m32, ids[13:], cache)
    _close(torch.cat([a, b]), full, TOL)


def test_decode_does_not_touch_other_caches(m32: DeepseekV4Model) -> None:
    _, cache = oracle_prefill(m32, _ids(10, seed=1))
    snapshot = cache.clone()
    oracle_decode(m32, _ids(1, seed=2), [snapshot.clone()])
    assert cache.length == 10
    assert torch.equal(cache.layers[1].compressor.kv, snapshot.layers[1].compressor.kv)


# ----------------------------------------------------------------------------- mHC, rope
def test_mhc_comb_doubly_stochastic(m32: DeepseekV4Model) -> None:
    layer = m32.layers[0]
    h = 3.0 * _randn(N, CFG.hc_mult, CFG.hidden_size, seed=9)
    pre, post, comb = oracle.mhc_weights(
        h, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base,
        rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps, iters=CFG.hc_sinkhorn_iters,
    )
    assert (comb > 0).all() and (pre > 0).all() and ((post > 0) & (post < 2)).all()
    torch.testing.assert_close(comb.sum(-2), torch.ones(N, CFG.hc_mult), atol=1e-5, rtol=0)
    torch.testing.assert_close(comb.sum(-1), torch.ones(N, CFG.hc_mult), atol=1e-3, rtol=0)


def test_mhc_fused_equals_post_then_pre(m16: DeepseekV4Model) -> None:
    layer = m16.layers[1]
    kw = dict(rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps, iters=CFG.hc_sinkhorn_iters)
    h = _randn(6, CFG.hc_mult, CFG.hidden_size, seed=1, dtype=torch.bfloat16)
    x, post, comb = oracle.mhc_pre(h, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base, **kw)
    assert x.shape == (6, CFG.hidden_size) and x.dtype == torch.bfloat16
    ffn = (layer.hc_ffn_fn, layer.hc_ffn_scale, layer.hc_ffn_base)
    fused = oracle.mhc_fused_post_pre(x, h, post, comb, *ffn, **kw)
    h2 = oracle.mhc_post(x, h, post, comb)
    for a, b in zip(fused, (h2, *oracle.mhc_pre(h2, *ffn, **kw)), strict=True):
        assert torch.equal(a, b)
    out = oracle.hc_head(h2, m16.hc_head_fn, m16.hc_head_scale, m16.hc_head_base,
                         rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps)
    assert out.shape == (6, CFG.hidden_size) and out.dtype == torch.bfloat16


def test_rope_inverse_and_yarn() -> None:
    inv = layer_inv_freq(CFG, 4)
    plain = oracle.yarn_inv_freq(CFG.qk_rope_head_dim, CFG.compress_rope_theta)
    assert torch.allclose(inv[0], plain[0])  # fastest pair: untouched by YaRN
    torch.testing.assert_close(inv[-1], plain[-1] / CFG.rope_scaling["factor"])  # slowest: interpolated
    x = _randn(5, 3, CFG.head_dim, seed=2)
    cos, sin = oracle.rope_cos_sin(torch.arange(5) * 1000, inv)
    y = oracle.rope_last(x, cos, sin)
    nope = CFG.head_dim - CFG.qk_rope_head_dim
    assert torch.equal(y[..., :nope], x[..., :nope])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(oracle.rope_last(y, cos, sin, inverse=True), x, atol=1e-5, rtol=1e-5)
