"""DeepSeek-V4 config values, checkpoint naming, deterministic init and safetensors loading."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from dsv4_compile.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4Model,
    load_safetensors,
    oracle_prefill,
    save_safetensors,
)

TINY = DeepseekV4Config.tiny()

# Every name of the public checkpoint layout that this package builds (bf16 reference: no FP8 scales).
_LAYER = r"layers\.\d+\."
_ALLOWED = [re.compile(p) for p in (
    r"embed\.weight", r"norm\.weight", r"head\.weight", r"hc_head_(fn|base|scale)",
    _LAYER + r"(attn_norm|ffn_norm)\.weight",
    _LAYER + r"hc_(attn|ffn)_(fn|base|scale)",
    _LAYER + r"attn\.(wq_a|q_norm|wq_b|wkv|kv_norm|wo_a|wo_b)\.weight",
    _LAYER + r"attn\.attn_sink",
    _LAYER + r"attn\.(indexer\.)?compressor\.(wkv\.weight|wgate\.weight|ape|norm\.weight)",
    _LAYER + r"attn\.indexer\.(wq_b|weights_proj)\.weight",
    _LAYER + r"ffn\.gate\.(weight|bias|tid2eid)",
    _LAYER + r"ffn\.(experts\.\d+|shared_experts)\.w[123]\.weight",
)]


@pytest.fixture(scope="module")
def tiny() -> DeepseekV4Model:
    return DeepseekV4Model(TINY, seed=0)


# ----------------------------------------------------------------------------- config
def test_flash_and_pro_values() -> None:
    f, p = DeepseekV4Config.flash(), DeepseekV4Config.pro()
    assert (f.hidden_size, f.num_hidden_layers, f.num_attention_heads, f.head_dim) == (4096, 43, 64, 512)
    assert f.compress_ratios[:4] == [0, 0, 4, 128] and f.compress_ratios[-2:] == [4, 0]
    assert len(f.compress_ratios) == 44  # 43 layers + the MTP layer
    assert (f.index_topk, f.n_routed_experts, f.routed_scaling_factor) == (512, 256, 1.5)
    assert f.rope_scaling["type"] == "yarn" and f.rope_scaling["factor"] == 16
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.o_groups) == (7168, 61, 128, 16)
    assert (p.q_lora_rank, p.index_topk, p.n_routed_experts, p.moe_intermediate_size) == (1536, 1024, 384, 3072)
    assert len(p.compress_ratios) == 62 and p.routed_scaling_factor == 2.5


def test_tiny_keeps_every_structural_feature() -> None:
    ratios = TINY.compress_ratios[: TINY.num_hidden_layers]
    assert 0 in ratios and 4 in ratios and any(r not in (0, 4) for r in ratios)
    assert 0 < TINY.num_hash_layers < TINY.num_hidden_layers
    assert TINY.hc_mult == 4 and TINY.rope_scaling is not None
    assert TINY.sliding_window < 40 and TINY.index_topk < 40 // 4
    assert DeepseekV4Config.tiny(heavy_ratio=128).compress_ratios[2] == 128


def test_with_overrides_and_validation() -> None:
    f = DeepseekV4Config.flash()
    small = f.with_(n_routed_experts=8, num_hidden_layers=4)
    assert small.n_routed_experts == 8 and small.hidden_size == 4096 and f.n_routed_experts == 256
    small.rope_scaling["factor"] = 1.0
    assert f.rope_scaling["factor"] == 16  # deep copy
    with pytest.raises(ValueError):
        f.with_(num_hidden_layers=50)
    assert DeepseekV4Config.from_dict({"hidden_size": 4096, "model_type": "deepseek_v4"}) == f


# ----------------------------------------------------------------------------- names, shapes, dtypes
def test_state_dict_names_follow_checkpoint(tiny: DeepseekV4Model) -> None:
    names = set(tiny.state_dict())
    expect = {
        "embed.weight", "norm.weight", "head.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
        "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
        "layers.0.hc_attn_fn", "layers.0.hc_attn_base", "layers.0.hc_attn_scale",
        "layers.0.hc_ffn_fn", "layers.0.hc_ffn_base", "layers.0.hc_ffn_scale",
        "layers.0.attn.wq_a.weight", "layers.0.attn.q_norm.weight", "layers.0.attn.wq_b.weight",
        "layers.0.attn.wkv.weight", "layers.0.attn.kv_norm.weight", "layers.0.attn.wo_a.weight",
        "layers.0.attn.wo_b.weight", "layers.0.attn.attn_sink",
        "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.wgate.weight",
        "layers.1.attn.compressor.ape", "layers.1.attn.compressor.norm.weight",
        "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.weights_proj.weight",
        "layers.1.attn.indexer.compressor.wkv.weight", "layers.1.attn.indexer.compressor.ape",
        "layers.2.attn.compressor.wkv.weight",
        "layers.0.ffn.gate.weight", "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias",
        "layers.3.ffn.experts.7.w1.weight", "layers.3.ffn.experts.0.w2.weight",
        "layers.3.ffn.experts.5.w3.weight", "layers.3.ffn.shared_experts.w2.weight",
    }
    assert expect <= names, sorted(expect - names)
    absent = {"layers.0.attn.compressor.wkv.weight", "layers.2.attn.indexer.wq_b.weight",
              "layers.0.ffn.gate.bias", "layers.1.ffn.gate.tid2eid"}
    assert not absent & names
    stray = [n for n in names if not any(p.fullmatch(n) for p in _ALLOWED)]
    assert not stray


def test_flash_shapes_on_meta() -> None:
    cfg = DeepseekV4Config.flash().with_(num_hidden_layers=4, n_routed_experts=4, num_experts_per_tok=2)
    sd = DeepseekV4Model(cfg, device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["layers.0.attn.wq_b.weight"] == (64 * 512, 1024)
    assert shapes["layers.0.attn.wo_a.weight"] == (8 * 1024, 64 * 512 // 8)
    assert shapes["layers.0.attn.wo_b.weight"] == (4096, 8 * 1024)
    assert shapes["layers.0.hc_attn_fn"] == (24, 4 * 4096) and shapes["layers.0.hc_attn_base"] == (24,)
    assert shapes["layers.0.hc_attn_scale"] == (3,) and shapes["hc_head_fn"] == (4, 4 * 4096)
    assert shapes["layers.2.attn.compressor.wkv.weight"] == (2 * 512, 4096)  # ratio 4: overlapping
    assert shapes["layers.2.attn.compressor.ape"] == (4, 2 * 512)
    assert shapes["layers.3.attn.compressor.wgate.weight"] == (512, 4096)  # ratio 128
    assert shapes["layers.3.attn.compressor.ape"] == (128, 512)
    assert shapes["layers.2.attn.indexer.wq_b.weight"] == (64 * 128, 1024)
    assert shapes["layers.2.attn.indexer.weights_proj.weight"] == (64, 4096)
    assert shapes["layers.2.attn.indexer.compressor.wkv.weight"] == (2 * 128, 4096)
    assert shapes["layers.0.ffn.gate.tid2eid"] == (129280, 2)
    assert shapes["layers.3.ffn.gate.bias"] == (4,)
    assert shapes["layers.3.ffn.experts.3.w1.weight"] == (2048, 4096)
    assert shapes["layers.3.ffn.shared_experts.w2.weight"] == (4096, 2048)


def test_dtypes(tiny: DeepseekV4Model) -> None:
    sd = tiny.state_dict()
    for name in ("hc_head_fn", "layers.0.hc_ffn_base", "layers.1.attn.attn_sink",
                 "layers.1.attn.compressor.ape", "layers.1.ffn.gate.bias"):
        assert sd[name].dtype == torch.float32, name
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    assert sd["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- init
def test_init_is_deterministic(tiny: DeepseekV4Model) -> None:
    again, other = DeepseekV4Model(TINY, seed=0).state_dict(), DeepseekV4Model(TINY, seed=1).state_dict()
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, again[k]), k
    assert not torch.equal(tiny.state_dict()["layers.1.attn.wq_a.weight"], other["layers.1.attn.wq_a.weight"])
    # A tensor's value depends on (seed, name) only, not on the number of layers.
    two = DeepseekV4Model(TINY.with_(num_hidden_layers=2), seed=0).state_dict()
    for k, v in two.items():
        assert torch.equal(v, tiny.state_dict()[k]), k


def test_init_values_are_sane(tiny: DeepseekV4Model) -> None:
    t2e = tiny.state_dict()["layers.0.ffn.gate.tid2eid"]
    assert t2e.min() >= 0 and t2e.max() < TINY.n_routed_experts
    assert all(len(set(row)) == TINY.num_experts_per_tok for row in t2e.tolist())
    ids = torch.randint(0, TINY.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    logits, _ = oracle_prefill(tiny, ids)
    assert logits.isfinite().all() and 0.2 < logits.std() < 5  # O(1) activations in bf16


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_roundtrip_in_shards(tiny: DeepseekV4Model, tmp_path) -> None:
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(tmp_path / "b.safetensors"))
    target = DeepseekV4Model(TINY, seed=3)
    assert load_safetensors(target, tmp_path / "a.safetensors") == names[half:]
    assert load_safetensors(target, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == []
    for k, v in target.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_save_safetensors_loads_back(tiny: DeepseekV4Model, tmp_path) -> None:
    save_safetensors(tiny, tmp_path / "m.safetensors")
    target = DeepseekV4Model(TINY, seed=5)
    assert load_safetensors(target, str(tmp_path / "m.safetensors")) == []
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in target.state_dict().items())


def test_unknown_name_and_bad_shape_rejected(tiny: DeepseekV4Model, tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"layers.0.attn.not_a_weight": torch.zeros(2)}, str(path))
    with pytest.raises(KeyError, match="not_a_weight"):
        load_safetensors(tiny, path)
    save_file({"layers.0.attn.wq_a.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="shape"):
        load_safetensors(tiny, path)
