"""Attention family, FlashMLA: `_flashmla_C::sparse_decode_fwd` (fp8_ds_mla paged caches) and
`_flashmla_C::sparse_prefill_fwd` (bf16 kv).

Oracle: FlashMLA's documented math written here in fp64, one query token at a time: softmax over the valid
picked rows, the output then scaled by exp(lse) / (exp(lse) + exp(sink)), lse the natural log-sum-exp of the
scaled scores (+inf, and a zero output, for a query with nothing to attend to). The fp8_ds_mla caches are
built here byte by byte from values exact in fp64 (e4m3 values times powers of two, bf16 rope), so the oracle
needs no decoder. The `_flashmla_C` ops have no CPU kernel: only rewritten graphs run.
"""

import math

import pytest
import torch

from dsv4_compile.errors import LoweringContractError
from dsv4_compile.frontend.ops import vllm_attention
from dsv4_compile.frontend.ops.vllm import define_missing_ops
from dsv4_compile.lowering.lowerings import flashmla
from tests.conftest import lower_graph_testing

DECODE, PREFILL = "_flashmla_C::sparse_decode_fwd", "_flashmla_C::sparse_prefill_fwd"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
define_missing_ops()  # the ops vLLM's CUDA build has, without importing vLLM in this process


# ----------------------------------------------------------------------------- fp64 math
def attention64(q, sources, sink, scale, d_v):
    """q [N, H, D]; sources: (rows [R, D] fp64, indices [N, K], lengths [N] or None). -> out [N, H, d_v], lse."""
    n_tokens, heads, _ = q.shape
    out = torch.zeros(n_tokens, heads, d_v, dtype=torch.float64)
    lse = torch.full((n_tokens, heads), math.inf, dtype=torch.float64)
    for n in range(n_tokens):
        keys = []
        for rows, indices, lengths in sources:
            limit = indices.shape[-1] if lengths is None else int(lengths[n])
            keys += [rows[int(i)] for i in indices[n, :limit] if 0 <= int(i) < rows.shape[0]]
        if not keys:
            continue
        keys = torch.stack(keys)
        scores = q[n].double() @ keys.T * scale  # [H, k]
        token_lse = torch.logsumexp(scores, dim=-1)
        token_out = torch.softmax(scores, dim=-1) @ keys[:, :d_v]
        if sink is not None:
            token_out = token_out * torch.sigmoid(token_lse - sink.double()).unsqueeze(-1)
        out[n], lse[n] = token_out, token_lse
    return out, lse


def fp8_ds_mla_cache(num_blocks, block_size, gen, pad=0):
    """A paged fp8_ds_mla cache [num_blocks, block_size, 1, 584] (block stride block_size * 584 + pad bytes)
    and its rows in fp64 [num_blocks * block_size, 512]. Pad bytes are 0xFF (an e4m3 NaN)."""
    n = num_blocks * block_size
    nope = (0.5 * torch.randn(n, 448, generator=gen)).to(torch.float8_e4m3fn)
    exponents = torch.randint(124, 131, (n, 7), generator=gen)
    rope = torch.randn(n, 64, generator=gen).to(torch.bfloat16)
    rows = torch.cat([(nope.double().view(n, 7, 64) * torch.exp2(exponents.double() - 127).unsqueeze(-1)).view(n, 448),
                      rope.double()], dim=-1)
    data = torch.cat([nope.view(torch.uint8), rope.view(torch.uint8)], dim=-1).view(num_blocks, block_size * 576)
    scales = torch.cat([exponents.to(torch.uint8), torch.zeros(n, 1, dtype=torch.uint8)], -1)
    blocks = torch.full((num_blocks, block_size * 584 + pad), 0xFF, dtype=torch.uint8)
    blocks[:, :block_size * 576] = data
    blocks[:, block_size * 576:block_size * 584] = scales.view(num_blocks, block_size * 8)
    return blocks[:, :block_size * 584].view(num_blocks, block_size, 1, 584), rows


def check_close(actual, expected64, dtype):
    assert actual.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), expected64, rtol=1e-5, atol=1e-5)
    else:  # fp32 math, one rounding to bf16 (half an ulp, 2**-9 relative)
        torch.testing.assert_close(actual.double(), expected64, rtol=2 ** -8, atol=1e-5)


# ----------------------------------------------------------------------------- decode
def decode_case(dtype, b=3, s_q=2, heads=4, topk=6, extra_topk=5, seed=0, with_sink=True):
    gen = torch.Generator().manual_seed(seed)
    kv, rows = fp8_ds_mla_cache(4, 8, gen, pad=32)
    extra_kv, extra_rows = fp8_ds_mla_cache(3, 4, gen)
    q = (0.5 * torch.randn(b, s_q, heads, 512, generator=gen)).to(dtype)
    indices = torch.randint(0, 32, (b, s_q, topk), generator=gen, dtype=torch.int32)
    extra_indices = torch.randint(0, 12, (b, s_q, extra_topk), generator=gen, dtype=torch.int32)
    indices[0, 0, 1] = -1
    indices[1, -1, 3] = indices[1, -1, 2]  # a row picked twice counts twice
    extra_indices[0, -1, :2] = -1
    if b > 2:
        indices[2], extra_indices[2, 0] = -1, -1  # batch 2, token 0: nothing valid at all
    topk_length = torch.tensor([topk, 4, topk][:b], dtype=torch.int32)  # slots 4 and 5 of batch 1 are cut
    extra_topk_length = torch.tensor([extra_topk, extra_topk, 2][:b], dtype=torch.int32)
    sink = torch.randn(heads, generator=gen) if with_sink else None
    return (q, kv, indices, topk_length, sink, extra_kv, extra_indices, extra_topk_length), (rows, extra_rows)


def decode64(args, rows, d_v, scale):
    q, _, indices, topk_length, sink, _, extra_indices, extra_topk_length = args
    b, s_q, heads, _ = q.shape
    per_token = [(rows[0], indices.flatten(0, 1), topk_length.repeat_interleave(s_q)),
                 (rows[1], extra_indices.flatten(0, 1), extra_topk_length.repeat_interleave(s_q))]
    out, lse = attention64(q.flatten(0, 1), per_token, sink, scale, d_v)
    return out.view(b, s_q, heads, d_v), lse.view(b, s_q, heads).transpose(1, 2)


def decode_with_scheduler(q, kv, indices, topk_length, sink, extra_kv, extra_indices, extra_topk_length,
                          scheduler, splits, out):
    result, lse, _, _ = torch.ops._flashmla_C.sparse_decode_fwd(
        q, kv, indices, topk_length, sink, scheduler, splits, extra_kv, extra_indices, extra_topk_length, 512,
        0.05, out)
    return result * 2, lse


@DTYPES
def test_decode_through_backend(dtype):
    args, rows = decode_case(dtype)
    scheduler, splits = torch.zeros(16, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    out = torch.full((3, 2, 4, 512), 7.0, dtype=dtype)
    lo = lower_graph_testing(decode_with_scheduler, *args, scheduler, splits, out, expected_before=[DECODE],
                             expected_after=["sparse_decode_fwd_native"], unexpected_after=["_flashmla_C"])
    (native,) = [n for n in lo.gm.graph.nodes if n.op == "call_function" and "native" in str(n.target)]
    assert not {"tile_scheduler_metadata", "num_splits"} & set(native.kwargs)
    assert lo.report["attention"].matched == 1

    expected, expected_lse = decode64(args, rows, 512, 0.05)
    compiled = torch.compile(decode_with_scheduler, backend="dsv4_xpu")
    doubled, lse = compiled(*args, scheduler, splits, out)
    check_close(out, expected, dtype)  # the caller's buffer is written
    torch.testing.assert_close(doubled, out * 2)
    assert lse.dtype == torch.float32 and lse.shape == (3, 4, 2)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-4)
    assert torch.equal(out[2, 0], torch.zeros_like(out[2, 0]))  # no valid key: zero output, lse +inf
    assert torch.isinf(lse[2, :, 0]).all() and (lse[2, :, 0] > 0).all()
    assert torch.isfinite(lse[2, :, 1]).all() and not out.isnan().any()


def decode_without_out(q, kv, indices, topk_length, sink, extra_kv, extra_indices, extra_topk_length):
    return vllm_attention.flash_mla_with_kvcache(
        q, kv, None, None, 384, None, softmax_scale=0.05, is_fp8_kvcache=True, indices=indices, attn_sink=sink,
        extra_k_cache=extra_kv, extra_indices_in_kvcache=extra_indices, topk_length=topk_length,
        extra_topk_length=extra_topk_length)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
def test_decode_substitute_without_out_buffer(with_sink):
    """The substitute of vLLM's flash_mla_with_kvcache, d_v < 512, no sink (plain softmax) or a sink."""
    args, rows = decode_case(torch.float32, seed=1, with_sink=with_sink)
    lo = lower_graph_testing(decode_without_out, *args, expected_before=[DECODE], unexpected_after=["_flashmla_C"])
    out, lse = lo.run()
    expected, expected_lse = decode64(args, rows, 384, 0.05)
    check_close(out, expected, torch.float32)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-4)


def test_decode_main_cache_only_and_one_query_token():
    args, rows = decode_case(torch.bfloat16, b=2, s_q=1, seed=2)
    q, kv, indices, topk_length, sink = args[:5]
    result, lse, _, _ = flashmla.sparse_decode_fwd_native(q, kv, indices, topk_length, sink, None, None, None, 512,
                                                           0.05, None)
    expected, expected_lse = attention64(q.flatten(0, 1), [(rows[0], indices.flatten(0, 1), topk_length)], sink,
                                         0.05, 512)
    check_close(result.flatten(0, 1), expected, torch.bfloat16)
    torch.testing.assert_close(lse[..., 0].double(), expected_lse, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- prefill
def prefill_case(dtype, s_q=5, heads=4, h_kv=1, d_qk=576, s_kv=20, topk=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (0.2 * torch.randn(s_q, heads, d_qk, generator=gen)).to(dtype)
    kv = (0.2 * torch.randn(s_kv, h_kv, d_qk, generator=gen)).to(dtype)
    indices = torch.randint(0, s_kv, (s_q, h_kv, topk), generator=gen, dtype=torch.int32)
    indices[0, :, 0] = -1
    indices[1, :, 2] = s_kv + 3  # past the kv: invalid too
    indices[3] = -1  # token 3: nothing to attend to
    topk_length = torch.tensor([topk, 3, topk, topk, 5][:s_q], dtype=torch.int32)
    sink = torch.tensor([0.5, -1.0, math.inf, -math.inf][:heads])  # +inf: output zero; -inf: no sink
    return q, kv, indices, topk_length, sink


def prefill64(q, kv, indices, topk_length, sink, scale, d_v):
    s_q, heads, _ = q.shape
    h_kv = kv.shape[1]
    group = heads // h_kv
    out = torch.empty(s_q, heads, d_v, dtype=torch.float64)
    lse = torch.empty(s_q, heads, dtype=torch.float64)
    for g in range(h_kv):
        heads_g = slice(g * group, (g + 1) * group)
        out[:, heads_g], lse[:, heads_g] = attention64(
            q[:, heads_g], [(kv[:, g].double(), indices[:, g], topk_length)], sink[heads_g], scale, d_v)
    return out, lse


def prefill(q, kv, indices, topk_length, sink, out):
    return vllm_attention.flash_mla_sparse_fwd(q, kv, indices, 0.1, 512, sink, topk_length, out)


@DTYPES
def test_prefill_through_backend(dtype):
    q, kv, indices, topk_length, sink = prefill_case(dtype)
    out = torch.full((5, 4, 512), 3.0, dtype=dtype)
    lower_graph_testing(prefill, q, kv, indices, topk_length, sink, out, expected_before=[PREFILL],
                        expected_after=["sparse_prefill_fwd_native"], unexpected_after=["_flashmla_C"])
    result, max_logits, lse = torch.compile(prefill, backend="dsv4_xpu")(q, kv, indices, topk_length, sink, out)
    expected, expected_lse = prefill64(q, kv, indices, topk_length, sink, 0.1, 512)
    check_close(out, expected, dtype)
    torch.testing.assert_close(result, out)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))  # sink +inf
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isposinf(lse[3]).all()
    assert torch.isneginf(max_logits[3]).all()
    valid = [int(i) for i in indices[4, 0, :5]]
    scores = q[4].double() @ kv[valid, 0].double().T * 0.1
    torch.testing.assert_close(max_logits[4].double(), scores.amax(-1), rtol=1e-5, atol=1e-5)


def test_prefill_grouped_kv_heads_without_out_buffer():
    q, kv, indices, _, sink = prefill_case(torch.float32, heads=4, h_kv=2, d_qk=512, seed=3)
    result, _, lse = flashmla.sparse_prefill_fwd_native(q, kv, indices, 0.1, 256, sink, None, None)
    expected, expected_lse = prefill64(q, kv, indices, None, sink, 0.1, 256)
    check_close(result, expected, torch.float32)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- contract
def test_contract_refuses_a_wrong_out_buffer():
    args, _ = decode_case(torch.bfloat16)
    wrong = torch.empty(3, 2, 4, 512, dtype=torch.float32)
    with pytest.raises(LoweringContractError, match="out_"):
        lower_graph_testing(decode_with_scheduler, *args, None, None, wrong)
    with pytest.raises(ValueError, match="fp8_ds_mla"):
        flashmla.check_sparse_decode(args[0], args[1][..., :576], *args[2:5], None, None, *args[5:], 512, 0.05, None)


def test_zero_tokens_and_zero_topk():
    kv, _ = fp8_ds_mla_cache(2, 4, torch.Generator().manual_seed(4))
    q = torch.zeros(0, 1, 4, 512, dtype=torch.bfloat16)
    out, lse, _, _ = flashmla.sparse_decode_fwd_native(q, kv, torch.zeros(0, 1, 3, dtype=torch.int32), None,
                                                       torch.zeros(4), None, None, None, 512, 0.1, None)
    assert out.shape == (0, 1, 4, 512) and lse.shape == (0, 4, 1)
    q, kv = torch.randn(2, 4, 512), torch.randn(5, 1, 512)
    out, max_logits, lse = flashmla.sparse_prefill_fwd_native(q, kv, torch.zeros(2, 1, 0, dtype=torch.int32), 0.1,
                                                              512, torch.zeros(4), None, None)
    assert torch.equal(out, torch.zeros(2, 4, 512))
    assert torch.isneginf(max_logits).all() and torch.isposinf(lse).all()
