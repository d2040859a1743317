"""Routing family: `_moe_C::topk_softplus_sqrt`, DeepSeek-V4's MoE router (three out tensors, mutated in place).

Oracle: the routing written here in fp64 one token at a time from the CUDA kernel's documented semantics
(sqrt-softplus scores, bias for selection only, hash experts, image rows with bias_vl, padding rows, renormalise,
routed scaling, token_expert_indices = k * T + t). Scores are kept distinct so the top-k has no ties. The op has
no CPU kernel: only the rewritten graph runs here.
"""

import math

import pytest
import torch

import dsv4_compile.lowering.lowerings.routing  # noqa: F401 - registers the lowering
from dsv4_compile.frontend.ops.vllm import define_missing_ops
from dsv4_compile.lowering.lowerings.routing import check_topk_softplus_sqrt
from tests.conftest import lower_graph_testing

define_missing_ops()  # the ops vLLM's CUDA build has, without importing vLLM in this process

OP, NATIVE = "_moe_C::topk_softplus_sqrt", "topk_softplus_sqrt_native"
UNTOUCHED = -7  # what token_expert_indices holds before the call
LO = 1000  # image_sentinel_lo


# ----------------------------------------------------------------------------- fp64 oracle
def score64(x: float) -> float:
    if math.isnan(x):
        return 0.0
    soft = x if x > 20 else math.log1p(math.exp(x))
    return math.sqrt(soft)


def route64(logits, k, renormalize, scale, bias=None, input_ids=None, tid2eid=None, is_padding=None,
            bias_vl=None, lo=0):
    """(weights [T, k] fp64, experts [T, k], topk_rows [T]): one token at a time."""
    t_count, e_count = logits.shape
    weights, experts, topk_rows = torch.zeros(t_count, k, dtype=torch.float64), [], []
    for t in range(t_count):
        row = [score64(float(v)) for v in logits[t].double()]
        token = int(input_ids[t]) if input_ids is not None else None
        image = bias_vl is not None and lo > 0 and lo <= token < lo + 5
        if is_padding is not None and bool(is_padding[t]):
            experts.append([-1] * k)
            topk_rows.append(tid2eid is None or image)
            continue
        if tid2eid is not None and not image:
            chosen = [int(e) for e in tid2eid[token]]
            topk_rows.append(False)
        else:
            offsets = bias_vl if image else bias
            choice = [row[e] + (float(offsets[e]) if offsets is not None else 0.0) for e in range(e_count)]
            chosen = sorted(range(e_count), key=lambda e: (-choice[e], e))[:k]
            topk_rows.append(True)
        w = torch.tensor([row[e] for e in chosen], dtype=torch.float64)
        if renormalize:
            w = w / (w.sum() if w.sum() > 0 else 1.0)
        weights[t] = w * scale
        experts.append(chosen)
    return (weights, torch.tensor(experts, dtype=torch.int64).reshape(t_count, k),
            torch.tensor(topk_rows, dtype=torch.bool))


def expected_source_rows(t_count, k, topk_rows):
    rows = torch.arange(k).reshape(1, k) * t_count + torch.arange(t_count).reshape(-1, 1)
    return torch.where(topk_rows.reshape(-1, 1), rows, UNTOUCHED).to(torch.int32)


# ----------------------------------------------------------------------------- inputs and graphs
def make_logits(t, e, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A permutation per row spaced by 0.05: distinct scores, distinct in bf16 too, some past 20 (identity).
    ranks = torch.stack([torch.randperm(e, generator=gen) for _ in range(t)]) if t else torch.zeros(0, e)
    return (ranks.float() * 0.05 - 0.025 * e + 10.0 * (torch.arange(e) % 7 == 3)).to(dtype)


def route(logits, k, renormalize, scale, bias, input_ids, tid2eid, is_padding, bias_vl, lo):
    weights = torch.empty(logits.shape[0], k, dtype=torch.float32)
    experts = torch.empty(logits.shape[0], k, dtype=torch.int32)
    source = torch.full((logits.shape[0], k), UNTOUCHED, dtype=torch.int32)
    torch.ops._moe_C.topk_softplus_sqrt(weights, experts, source, logits, renormalize, scale, bias, input_ids,
                                        tid2eid, is_padding, bias_vl, lo)
    return weights, experts, source


def lowered_route(*args):
    lo = lower_graph_testing(route, *args, expected_before=[OP], expected_after=[NATIVE], unexpected_after=[OP])
    assert lo.report["routing"].matched == 1
    return lo.run()


def check_against_oracle(outs, logits, k, renormalize, scale, bias=None, input_ids=None, tid2eid=None,
                         is_padding=None, bias_vl=None, lo=0):
    weights, experts, source = outs
    e_weights, e_experts, topk_rows = route64(logits, k, renormalize, scale, bias, input_ids, tid2eid,
                                              is_padding, bias_vl, lo)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int32
    assert torch.equal(experts.long(), e_experts)
    # fp32 scores against fp64 (the biased choice minus its bias rounds once more than the score)
    torch.testing.assert_close(weights.double(), e_weights, rtol=1e-5, atol=1e-5)
    return source, topk_rows


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("t", [0, 1, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_bias_routing_matches_the_math(dtype, t, renormalize):
    e, k, scale = 64, 6, 2.5
    logits = make_logits(t, e, dtype)
    bias = torch.linspace(-0.3, 0.3, e)[torch.randperm(e, generator=torch.Generator().manual_seed(1))]
    outs = lowered_route(logits, k, renormalize, scale, bias, None, None, None, None, 0)
    source, topk_rows = check_against_oracle(outs, logits, k, renormalize, scale, bias)
    assert torch.equal(source, expected_source_rows(t, k, topk_rows))
    if t and renormalize:
        torch.testing.assert_close(outs[0].sum(-1), torch.full((t,), scale))


def test_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])  # expert 3 has the lowest score but wins on bias
    weights, experts, _ = lowered_route(logits, 2, False, 1.0, bias, None, None, None, None, 0)
    assert experts.tolist() == [[3, 0]]
    torch.testing.assert_close(weights.double(), torch.tensor([[score64(0.0), score64(3.0)]], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)  # 100 + s - 100 keeps ~1e-5 of s


def test_no_bias_nan_and_large_logits():
    logits = torch.tensor([[float("nan"), 25.0, -30.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    outs = lowered_route(logits, 2, False, 1.0, None, None, None, None, None, 0)
    check_against_oracle(outs, logits, 2, False, 1.0)
    assert outs[0][0, 0].item() == pytest.approx(5.0)  # sqrt(25): softplus is the identity past 20


@pytest.mark.parametrize("hashed", [False, True], ids=["bias", "hash"])
def test_padding_rows_weigh_nothing_and_route_nowhere(hashed):
    t, e, k = 6, 32, 4
    logits = make_logits(t, e, torch.float32, seed=2)
    padding = torch.tensor([False, True, False, False, True, True])
    ids = torch.arange(t, dtype=torch.int64)
    tid2eid = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k] for i in range(t)])
    extra = (ids, tid2eid) if hashed else (None, None)
    outs = lowered_route(logits, k, True, 1.5, torch.zeros(e), *extra, padding, None, 0)
    source, topk_rows = check_against_oracle(outs, logits, k, True, 1.5, torch.zeros(e), *extra, padding)
    assert (outs[1][padding] == -1).all() and (outs[0][padding] == 0).all()
    assert torch.equal(source, expected_source_rows(t, k, topk_rows))


def test_renormalise_small_scores_summing_below_one():
    # very negative logits: sqrt(softplus) ~ 1e-3, so the chosen weights sum far below 1 before renormalising
    t, e, k = 5, 64, 6
    logits = make_logits(t, e, torch.float32) - 20.0
    outs = lowered_route(logits, k, True, 1.0, None, None, None, None, None, 0)
    check_against_oracle(outs, logits, k, True, 1.0)
    torch.testing.assert_close(outs[0].sum(-1), torch.ones(t))


def test_hash_table_entries_past_the_last_expert_stay_in_range():
    # a table entry >= num_experts (a checkpoint for more experts) is clamped to the last expert, never an index
    # past the expert weights
    t, e, k = 3, 16, 4
    tid2eid = torch.tensor([[0, 1, 2, 3], [12, 13, 14, 15], [15, 16, 40, 2]], dtype=torch.int64)
    ids = torch.tensor([0, 1, 2], dtype=torch.int64)
    _, experts, _ = lowered_route(make_logits(t, e, torch.float32), k, True, 1.0, None, ids, tid2eid, None,
                                  None, 0)
    assert experts.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15], [15, 15, 15, 2]]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_hash_routing_takes_experts_from_the_table(dtype, index_dtype):
    t, e, k, vocab = 7, 64, 6, 50
    gen = torch.Generator().manual_seed(3)
    logits = make_logits(t, e, dtype, seed=3)
    tid2eid = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(vocab)]).to(index_dtype)
    ids = torch.randint(0, vocab, (t,), generator=gen, dtype=index_dtype)
    bias = torch.full((e,), 50.0)  # a hash layer's experts ignore the bias
    outs = lowered_route(logits, k, True, 2.0, bias, ids, tid2eid, None, None, 0)
    source, topk_rows = check_against_oracle(outs, logits, k, True, 2.0, bias, ids, tid2eid)
    assert torch.equal(outs[1].long(), tid2eid[ids.long()].long())
    assert not topk_rows.any() and (source == UNTOUCHED).all()  # hash rows leave the buffer as it was


@pytest.mark.parametrize("hashed", [False, True], ids=["bias", "hash"])
def test_image_rows_select_with_bias_vl(hashed):
    t, e, k = 8, 64, 6
    logits = make_logits(t, e, torch.float32, seed=4)
    ids = torch.tensor([5, LO, LO + 4, LO + 5, LO - 1, 7, LO + 2, 9], dtype=torch.int64)  # rows 1, 2, 6: images
    bias = torch.linspace(0.0, 0.2, e)
    bias_vl = torch.linspace(3.0, -3.0, e)  # favours low expert ids
    tid2eid = (torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k]
                            for i in range(LO + 6)]) if hashed else None)
    outs = lowered_route(logits, k, True, 1.0, bias, ids, tid2eid, None, bias_vl, LO)
    source, topk_rows = check_against_oracle(outs, logits, k, True, 1.0, bias, ids, tid2eid, None, bias_vl, LO)
    assert topk_rows.tolist() == ([False, True, True, False, False, False, True, False] if hashed else [True] * t)
    assert torch.equal(source, expected_source_rows(t, k, topk_rows))
    # Disabled by image_sentinel_lo = 0: every row routes as a text row.
    plain = lowered_route(logits, k, True, 1.0, bias, ids, tid2eid, None, bias_vl, 0)
    check_against_oracle(plain, logits, k, True, 1.0, bias, ids, tid2eid)
    assert not torch.equal(plain[1], outs[1])


def test_the_fused_hash_kernel_writes_no_token_expert_indices():
    """fp32 logits, k = 6, renormalize, 256 experts: the CUDA build's fused hash kernel, which leaves
    token_expert_indices alone even for image rows."""
    t, e, k = 3, 256, 6
    logits = make_logits(t, e, torch.float32, seed=5)
    ids = torch.tensor([LO, 1, 2])
    tid2eid = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:k] for i in range(LO + 1)])
    outs = lowered_route(logits, k, True, 1.0, None, ids, tid2eid, None, torch.zeros(e), LO)
    source, _ = check_against_oracle(outs, logits, k, True, 1.0, None, ids, tid2eid, None, torch.zeros(e), LO)
    assert (source == UNTOUCHED).all()


def test_compiled_with_the_backend_writes_the_callers_buffers():
    t, e, k = 5, 32, 4
    logits = make_logits(t, e, torch.bfloat16, seed=6)
    bias = torch.linspace(-0.1, 0.1, e)
    padding = torch.tensor([False, False, True, False, False])

    def router(weights, experts, source, logits, bias, padding):
        torch.ops._moe_C.topk_softplus_sqrt(weights, experts, source, logits, True, 2.0, bias, None, None, padding)
        return weights.sum()

    weights, experts = torch.zeros(t, k), torch.zeros(t, k, dtype=torch.int64)
    source = torch.zeros(t, k, dtype=torch.int32)
    total = torch.compile(router, backend="dsv4_xpu", fullgraph=True)(weights, experts, source, logits, bias, padding)
    e_weights, e_experts, topk_rows = route64(logits, k, True, 2.0, bias, None, None, padding)
    assert torch.equal(experts, e_experts)
    torch.testing.assert_close(weights.double(), e_weights, rtol=1e-5, atol=1e-5)
    assert torch.equal(source, expected_source_rows(t, k, topk_rows).masked_fill(~topk_rows.reshape(-1, 1), 0))
    torch.testing.assert_close(total, weights.sum())


@pytest.mark.parametrize(("change", "why"), [
    (dict(gating_output=torch.zeros(2, 10)), "no instance for 10 experts"),
    (dict(topk_weights=torch.zeros(2, 4, dtype=torch.bfloat16)), "topk_weights must be fp32"),
    (dict(token_expert_indices=torch.zeros(2, 3, dtype=torch.int32)), r"token_expert_indices has shape \(2, 3\)"),
    (dict(tid2eid=torch.zeros(9, 4, dtype=torch.int64)), "need input_ids"),
    (dict(tid2eid=torch.zeros(9, 4, dtype=torch.int32), input_ids=torch.zeros(2, dtype=torch.int64)),
     "must share a dtype"),
    (dict(bias_vl=torch.zeros(16, dtype=torch.bfloat16), input_ids=torch.zeros(2, dtype=torch.int64)),
     "bias_vl must be fp32"),
    (dict(is_padding=torch.zeros(3, dtype=torch.bool)), "is_padding must be bool of shape"),
    (dict(input_ids=torch.zeros(3, dtype=torch.int64), tid2eid=torch.zeros(9, 4, dtype=torch.int64)),
     r"input_ids must be int32 or int64 with 2 ids"),
    (dict(input_ids=torch.zeros(1, dtype=torch.int64), tid2eid=torch.zeros(9, 4, dtype=torch.int64)),
     r"input_ids must be int32 or int64 with 2 ids"),
], ids=["experts", "weights-dtype", "indices-shape", "hash-no-ids", "hash-dtypes", "bias-vl", "padding",
        "more-ids", "fewer-ids"])
def test_contract_violations_are_refused(change, why):
    args = dict(topk_weights=torch.zeros(2, 4), topk_indices=torch.zeros(2, 4, dtype=torch.int32),
                token_expert_indices=torch.zeros(2, 4, dtype=torch.int32), gating_output=torch.zeros(2, 16),
                bias=None, input_ids=None, tid2eid=None, is_padding=None, bias_vl=None)
    with pytest.raises(ValueError, match=why):
        check_topk_softplus_sqrt(**{**args, **change})
