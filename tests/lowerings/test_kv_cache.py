"""KV-cache family: `_C::fused_deepseek_v4_*` q-norm + rope + KV-cache insert ops, and the fp8_ds_mla codec.

Oracle: the math written here in fp64 (RMSNorm, GPT-J rope, e4m3 rounding from its definition: 3 mantissa bits,
round half to even, normal exponents from -6, UE8M0 scale 2**ceil(log2(max(amax, 1e-4) / 448)). The ops are
defined from our DEFINITIONS (no vLLM here); only the lowered code runs, never the op.
"""

import pytest
import torch

from dsv4_compile.frontend.ops.vllm import define_missing_ops
from dsv4_compile.lowering.lowerings import fp8_ds_mla as codec
from dsv4_compile.lowering.lowerings import kv_cache
from tests.conftest import lower_graph_testing

define_missing_ops()  # the ops vLLM's CUDA build has, without importing vLLM in this process

H, PADDED, EPS, BLOCK, BLOCKS, MAX_POS = 3, 8, 1e-6, 4, 5, 32
SLOTS = [5, -1, 0, 19, 7, -1]  # slot 19: the last of block 4


# ----------------------------------------------------------------------------- fp64 math
def cos_sin_table(max_pos=MAX_POS):
    freqs = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


def rope64(x, pos, table):
    """GPT-J rope of the last 64 values: pair i = (x[448 + 2i], x[449 + 2i]), angle i of row `pos`."""
    out = x.double().clone()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (32,)
    c, s = table.double()[pos, :32].reshape(shape), table.double()[pos, 32:].reshape(shape)
    even, odd = out[..., 448::2].clone(), out[..., 449::2].clone()
    out[..., 448::2], out[..., 449::2] = even * c - odd * s, even * s + odd * c
    return out


def qnorm64(q):
    q = q.double()
    return q / torch.sqrt(q.square().mean(-1, keepdim=True) + EPS)


def e4m3_64(v):
    """Round to e4m3fn: quantum 2**(e - 3) for the binade e (subnormals share e = -6), half to even."""
    v = v.double().clamp(-448.0, 448.0)
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -30))).clamp_min(-6)
    quantum = torch.exp2(e - 3)
    return torch.round(v / quantum) * quantum


def fp8_ds_mla64(latent):
    """(decoded nope [N, 448], scale exponents [N, 7]) of the fp8_ds_mla quantisation."""
    blocks = latent.double()[:, :448].unflatten(-1, (7, 64))
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-4) / 448))
    scale = torch.exp2(exponent)[..., None]
    return (e4m3_64(blocks / scale) * scale).flatten(1), exponent


def make(dtype, tokens=None, seed=0):
    tokens = len(SLOTS) if tokens is None else tokens
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(tokens, H, 512, generator=gen) * 3).to(dtype)
    kv = torch.randn(tokens, 512, generator=gen)
    kv[:, 64:128] *= 1e-3  # a block whose amax is small
    kv[:, 128:192] *= 1e-7  # a block under the 1e-4 amax floor
    kv[:, 192:256] *= 900.0  # a block whose scale is above 1
    kv = kv.to(dtype)
    pos = torch.randint(0, MAX_POS, (tokens,), generator=gen)
    slots = torch.tensor(SLOTS[:tokens] + [-1] * max(0, tokens - len(SLOTS)))
    cache = torch.randint(0, 256, (BLOCKS, BLOCK * codec.BYTES_PER_TOKEN + 40), generator=gen, dtype=torch.uint8)
    return q, kv, pos, slots, cache


def quant_insert(q, kv, cache, slots, pos, table, **flags):
    return kv_cache.qnorm_rope_kv_rope_quant_insert_native(q, kv, cache, slots, pos, table, PADDED, EPS, BLOCK,
                                                             **flags)


def tolerance(dtype):
    return {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


# ----------------------------------------------------------------------------- codec
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_codec_round_trip_is_the_fp64_quantisation(dtype):
    latent = make(dtype)[1]
    packed = codec.pack_fp8_ds_mla(latent)
    assert packed.shape == (latent.shape[0], 584) and packed.dtype == torch.uint8
    nope, exponent = fp8_ds_mla64(latent)
    assert torch.equal(packed[:, 576:583].long(), exponent.long() + 127)
    assert torch.all(packed[:, 583] == 0)
    decoded = codec.unpack_fp8_ds_mla(packed)
    assert torch.equal(decoded[:, :448].double(), nope)
    assert torch.equal(decoded[:, 448:], latent[:, 448:].to(torch.bfloat16).float())


def test_codec_floor_and_powers_of_two():
    latent = torch.zeros(3, 512)
    latent[1, :64] = 448.0  # exactly the e4m3 max: scale 1, byte 0x7e
    latent[2, :64] = 896.5  # just above 2 * 448: scale 4
    packed = codec.pack_fp8_ds_mla(latent)
    assert packed[0, 576:583].tolist() == [127 - 22] * 7  # ceil(log2(1e-4 / 448)) = -22
    assert packed[1, 576] == 127 and torch.all(packed[1, :64] == 0x7E)
    assert packed[2, 576] == 129
    assert torch.equal(codec.unpack_fp8_ds_mla(packed)[0], torch.zeros(512))


# ----------------------------------------------------------------------------- quant insert (fp8_ds_mla)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_insert_q_is_normed_roped_and_padded(dtype):
    q, kv, pos, slots, cache = make(dtype)
    table = cos_sin_table()
    out = quant_insert(q, kv, cache, slots, pos, table)
    assert out.shape == (len(SLOTS), PADDED, 512) and out.dtype == dtype
    torch.testing.assert_close(out[:, :H].double(), rope64(qnorm64(q), pos, table), **tolerance(dtype))
    assert torch.all(out[:, H:] == 0)


@pytest.mark.parametrize("flags", [{"apply_q_norm": False}, {"apply_q_rope": False}])
def test_quant_insert_q_flags(flags):
    q, kv, pos, slots, cache = make(torch.float32)
    table = cos_sin_table()
    out = quant_insert(q, kv, cache, slots, pos, table, **flags)
    expected = qnorm64(q) if flags.get("apply_q_norm", True) else q.double()
    expected = rope64(expected, pos, table) if flags.get("apply_q_rope", True) else expected
    torch.testing.assert_close(out[:, :H].double(), expected, **tolerance(torch.float32))


def assert_cache_is_fp64_insert(cache, before, kv, pos, slots, table):
    """Each written slot holds the fp64 quantisation of its roped kv row; every other byte is as it was."""
    roped = rope64(kv, pos, table)
    nope, exponent = fp8_ds_mla64(kv)  # rope leaves the nope part as it was
    written = torch.zeros_like(cache, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, BLOCK)
        data = slice(offset * 576, (offset + 1) * 576)
        scales = slice(BLOCK * 576 + offset * 8, BLOCK * 576 + (offset + 1) * 8)
        written[block, data] = written[block, scales] = True
        assert cache[block, scales].tolist() == [*(exponent[t].long() + 127).tolist(), 0]
        row = codec.unpack_fp8_ds_mla(torch.cat([cache[block, data], cache[block, scales]]))
        assert torch.equal(row[:448].double(), nope[t])
        torch.testing.assert_close(row[448:].double(), roped[t, 448:], atol=1e-2, rtol=2 ** -8)
    assert torch.equal(cache[~written], before[~written])  # skipped slots, other slots and block padding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_insert_cache_rows_and_untouched_bytes(dtype):
    q, kv, pos, slots, cache = make(dtype)
    table = cos_sin_table()
    before = cache.clone()
    quant_insert(q, kv, cache, slots, pos, table)
    assert_cache_is_fp64_insert(cache, before, kv, pos, slots, table)
    assert torch.equal(codec.read_fp8_ds_mla_slots(cache, torch.tensor([-1]), BLOCK), torch.zeros(1, 512))


def test_quant_insert_zero_tokens_and_all_skipped():
    table = cos_sin_table()
    q, kv, pos, slots, cache = make(torch.bfloat16, tokens=0)
    before = cache.clone()
    assert quant_insert(q, kv, cache, slots, pos, table).shape == (0, PADDED, 512)
    q, kv, pos, _, cache = make(torch.bfloat16, tokens=4)
    before = cache.clone()
    quant_insert(q, kv, cache, torch.full((4,), -1), pos, table)
    assert torch.equal(cache, before)


def test_quant_insert_writes_only_slot_mapping_rows():
    q, kv, pos, _, cache = make(torch.float32, tokens=4)
    table = cos_sin_table()
    before = cache.clone()
    out = quant_insert(q, kv, cache, torch.tensor([2, 9]), pos, table)  # kv rows 2, 3: padding, not written
    assert out.shape[0] == 4
    changed = (cache != before).nonzero()[:, 0].unique().tolist()
    assert changed == [0, 2]
    assert torch.equal(codec.read_fp8_ds_mla_slots(cache, torch.tensor([2, 9]), BLOCK)[:, :448].double(),
                       fp8_ds_mla64(kv[:2])[0])


@pytest.mark.parametrize("bad, message", [
    ({"kv_mxfp8": True}, "kv_mxfp8"), ({"is_q_interleaved": True}, "is_q_interleaved"),
    ({"q_head_padded": 2}, "q_head_padded"), ({"cache_block_size": 64}, "needs"),
])
def test_quant_insert_contract(bad, message):
    q, kv, pos, slots, cache = make(torch.bfloat16)
    arguments = dict(q_in=q, kv=kv, k_cache=cache, slot_mapping=slots, position_ids=pos,
                     cos_sin_cache=cos_sin_table(), q_head_padded=PADDED, eps=EPS, cache_block_size=BLOCK)
    kv_cache.check_quant_insert(**arguments)
    with pytest.raises(ValueError, match=message):
        kv_cache.check_quant_insert(**{**arguments, **bad})


# ----------------------------------------------------------------------------- plain-row caches
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_cache_bf16_insert(dtype):
    q, kv, pos, slots, _ = make(dtype)
    table = cos_sin_table()
    cache = torch.randn(BLOCKS, BLOCK, 512).bfloat16()
    before, q_before = cache.clone(), q.clone()
    kv_cache.qnorm_rope_kv_rope_full_cache_bf16_insert_native(q, kv, cache, slots, pos, table, EPS, BLOCK)
    torch.testing.assert_close(q.double(), rope64(qnorm64(q_before), pos, table), **tolerance(dtype))
    flat, expected = cache.view(-1, 512), before.view(-1, 512).clone()
    roped = rope64(kv, pos, table)
    for t, slot in enumerate(SLOTS):
        if slot >= 0:
            expected[slot] = roped[t].to(torch.bfloat16)
    torch.testing.assert_close(flat.double(), expected.double(), atol=0, rtol=2 ** -8)
    assert torch.equal(flat[[1, 2, 3, 4]], before.view(-1, 512)[[1, 2, 3, 4]])  # slots nobody writes


def test_full_cache_fp8_insert_saturates():
    q, kv, pos, slots, _ = make(torch.float32)
    kv[:, :64] = 1000.0  # 500 after the division by the kv scale 2: beyond e4m3's 448
    table = cos_sin_table()
    cache = torch.zeros(BLOCKS, BLOCK, 512, dtype=torch.float8_e4m3fn)
    q_fp8 = torch.empty_like(q, dtype=torch.float8_e4m3fn)
    q_before = q.clone()
    kv_scale, q_scale_inv = torch.tensor([2.0]), torch.tensor([100.0])
    kv_cache.qnorm_rope_kv_rope_full_cache_fp8_insert_native(q, kv, q_fp8, cache, slots, pos, table, kv_scale,
                                                             q_scale_inv, EPS, BLOCK)
    assert torch.equal(q, q_before)
    assert torch.equal(q_fp8.double(), e4m3_64(rope64(qnorm64(q), pos, table) * 100.0))
    assert q_fp8.float().abs().max() == 448.0
    roped = rope64(kv, pos, table)
    for t, slot in enumerate(SLOTS):
        if slot >= 0:
            assert torch.equal(cache.view(-1, 512)[slot].double(), e4m3_64(roped[t] / 2.0))
            assert torch.all(cache.view(-1, 512)[slot, :64].float() == 448.0)


@pytest.mark.parametrize("kind", ["fp8_ds_mla", "bf16", "fp8"])
def test_kv_rope_insert_is_the_kv_half(kind):
    q, kv, pos, slots, cache = make(torch.bfloat16)
    table = cos_sin_table()
    scale = torch.tensor([0.5]) if kind == "fp8" else None
    if kind != "fp8_ds_mla":
        cache = torch.zeros(BLOCKS, BLOCK, 512, dtype=torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn)
    expected = cache.clone()
    if kind == "fp8_ds_mla":
        quant_insert(q, kv, expected, slots, pos, table)  # checked against fp64 above
    for t, slot in enumerate(SLOTS):
        if slot >= 0 and kind == "bf16":
            expected.view(-1, 512)[slot] = rope64(kv, pos, table)[t].to(torch.bfloat16)
        elif slot >= 0 and kind == "fp8":
            expected.view(-1, 512)[slot] = e4m3_64(rope64(kv, pos, table)[t] / 0.5).to(torch.float8_e4m3fn)
    kv_cache.kv_rope_insert_native(kv, cache, slots, pos, table, BLOCK, scale)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(ValueError, match="kv_mxfp8"):
        kv_cache.check_kv_rope_insert(kv, cache, slots, pos, table, BLOCK, scale, kv_mxfp8=True)


# ----------------------------------------------------------------------------- through the backend
def quant_insert_call(q, kv, cache, slots, pos, table):
    return torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert(q, kv, cache, slots, pos, table, PADDED,
                                                                          EPS, BLOCK)


def test_pipeline_lowers_quant_insert():
    q, kv, pos, slots, cache = make(torch.bfloat16)
    table = cos_sin_table()
    lowered = lower_graph_testing(quant_insert_call, q, kv, cache, slots, pos, table,
                                  expected_before=["fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert"],
                                  unexpected_after=["fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert"])
    assert lowered.report is not None


def test_compiled_quant_insert_matches_fp64():
    q, kv, pos, slots, cache = make(torch.bfloat16)
    table = cos_sin_table()
    before = cache.clone()
    out = torch.compile(quant_insert_call, backend="dsv4_xpu", fullgraph=True)(q, kv, cache, slots, pos, table)
    torch.testing.assert_close(out[:, :H].double(), rope64(qnorm64(q), pos, table), **tolerance(torch.bfloat16))
    assert torch.all(out[:, H:] == 0)
    assert_cache_is_fp64_insert(cache, before, kv, pos, slots, table)


def test_compiled_full_cache_bf16_insert_writes_its_inputs():
    q, kv, pos, slots, _ = make(torch.float32)
    table = cos_sin_table()
    cache = torch.zeros(BLOCKS, BLOCK, 512, dtype=torch.bfloat16)
    q_before = q.clone()

    def insert(q, kv, cache, slots, pos, table):
        torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_full_cache_bf16_insert(q, kv, cache, slots, pos, table, EPS,
                                                                                 BLOCK)
        return q * 1.0

    out = torch.compile(insert, backend="dsv4_xpu", fullgraph=True)(q, kv, cache, slots, pos, table)
    expected_q = rope64(qnorm64(q_before), pos, table)
    torch.testing.assert_close(q.double(), expected_q, **tolerance(torch.float32))
    torch.testing.assert_close(out.double(), expected_q, **tolerance(torch.float32))
    roped = rope64(kv, pos, table)
    for t, slot in enumerate(SLOTS):
        if slot >= 0:
            torch.testing.assert_close(cache.view(-1, 512)[slot].double(), roped[t], atol=1e-6, rtol=2 ** -8)
    assert torch.all(cache.view(-1, 512)[[1, 2, 3, 4]] == 0)
