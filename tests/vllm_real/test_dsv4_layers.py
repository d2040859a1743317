"""vLLM's DeepSeek-V4 decoder layers on CPU, built by dsv4_layers.

The CPU port (its decoder layers on vLLM's CPU kernels) is the oracle; the first tests check it, not our
backend: the three-layer stack (window only + hash routing, ratio 4 with indexer, ratio 128) runs a prefill and
decode steps through vLLM's caches and metadata builders, and tokens decoded one at a time agree with the same
tokens prefilled. Then vLLM's NVIDIA layers 0, 1 (ratio 4, indexer) and 2 (ratio 128), with the CPU port's weights,
each compiled by dsv4_xpu (with Inductor) under cuda_compat("cpu"), are compared with it step by step."""

from __future__ import annotations

import tempfile

import pytest
import torch

from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels
from dsv4_compile.tools import vllm_layers as harness
from dsv4_compile.tools import vllm_steps as steps
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

# Every test here compares with vLLM's CPU port.
pytestmark = needs_vllm_cpu_kernels

# 130 prompt tokens: the ratio-128 layer has a compressed entry from position 127 on, the ratio-4 layer 32 of them,
# and the 128-token window is full.
PROMPT = 130
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def cpu_port():
    vllm_config, layers, weights = harness.tiny_stack(harness.build_cpu_port_layers)
    return vllm_config, layers, steps.allocate_kv_caches(vllm_config, max_tokens=256, num_sequences=7), weights


def _tokens(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(7))


def _run(cpu_port, token_ids: torch.Tensor, chunks: list[int], sequence_index: int,
         before_step=lambda step: None) -> torch.Tensor:
    vllm_config, layers, setup, _ = cpu_port
    config = vllm_config.model_config.hf_config
    stream = harness.residual_stream(token_ids, config.hidden_size, config.hc_mult)
    sequence = steps.new_sequence(setup, sequence_index)
    outputs, start = [], 0
    for step, size in enumerate(chunks):
        before_step(step)
        with steps.forward_step(vllm_config, setup, sequence, size) as positions:
            outputs.append(harness.run_layers(layers, stream[start:start + size], positions,
                                              token_ids[start:start + size]))
        start += size
    return torch.cat(outputs)


def test_prefill_then_decode_steps_are_finite_and_shaped(cpu_port):
    out = _run(cpu_port, _tokens(PROMPT + DECODE_STEPS), [PROMPT] + [1] * DECODE_STEPS, sequence_index=0)
    assert out.shape == (PROMPT + DECODE_STEPS, 4, 256) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # The residual stream stays O(1) (inputs are unit Gaussians); garbage cache reads give 1e30+ here.
    assert out.float().abs().max() < 100


def test_decode_steps_agree_with_one_prefill(cpu_port):
    # The same tokens as one prefill or as a prefill then single-token decodes (fresh blocks each). Both write
    # the same FP8 cache rows and read them with the same kernels; only the batch shape of the GEMMs and the
    # compressor's prefill/decode paths differ, so the rows agree to bf16 rounding (measured: 1 ulp at |x|~8).
    tokens = _tokens(PROMPT + DECODE_STEPS)
    whole = _run(cpu_port, tokens, [PROMPT + DECODE_STEPS], sequence_index=1).float()
    stepped = _run(cpu_port, tokens, [PROMPT] + [1] * DECODE_STEPS, sequence_index=2).float()
    assert torch.equal(stepped[:PROMPT], whole[:PROMPT])
    torch.testing.assert_close(stepped[PROMPT:], whole[PROMPT:], rtol=2e-2, atol=5e-2)


def test_decode_reads_the_cache_the_prefill_wrote(cpu_port):
    # Negative control for the test above: wiping the caches between prefill and decode must change the decode.
    _, _, setup, _ = cpu_port
    tokens = _tokens(PROMPT + 1)
    kept = _run(cpu_port, tokens, [PROMPT, 1], sequence_index=3).float()

    def wipe(step: int) -> None:
        if step == 1:
            for cache in setup.kv_caches.values():
                cache.zero_()

    wiped = _run(cpu_port, tokens, [PROMPT, 1], sequence_index=3, before_step=wipe).float()
    assert torch.equal(wiped[:PROMPT], kept[:PROMPT])
    assert (wiped[PROMPT] - kept[PROMPT]).abs().max() > 0.1


# --- the NVIDIA layers against the CPU port ----------------------------------------------------------------------

def _nvidia_twin(cpu_config, weights: list[dict[str, torch.Tensor]], num_sequences: int = 2):
    """vLLM's NVIDIA decoder layers holding the CPU port's weights, under a VllmConfig of their own (both
    register the same layer names in their config's static forward context), with their own caches."""
    nvidia_config = harness.make_vllm_config(cpu_config.model_config.model)
    layers = harness.build_nvidia_layers(nvidia_config)
    for values, layer in zip(weights, layers, strict=True):
        assert harness.copy_weights(values, layer) == []
    harness.process_weights(nvidia_config, layers)
    return nvidia_config, layers, steps.allocate_kv_caches(nvidia_config, max_tokens=256,
                                                            num_sequences=num_sequences)


@pytest.fixture(scope="module")
def nvidia_port(cpu_port):
    register_metadata_kernels()
    vllm_config, _, _, weights = cpu_port
    return _nvidia_twin(vllm_config, weights, num_sequences=3)


@pytest.fixture(scope="module")
def bias_routed_pair(cpu_port):
    """A one-layer model whose layer 0 routes by score + e_score_correction_bias (no hash layers): its CPU port
    and its NVIDIA twin."""
    folder = harness.write_tiny_config(tempfile.mkdtemp(), num_hidden_layers=1, compress_ratios=[0, 0],
                                       num_hash_layers=0)
    vllm_config = harness.make_vllm_config(folder)
    layers = harness.build_cpu_port_layers(vllm_config)
    weights = [harness.fill_weights(layer, seed=7) for layer in layers]
    assert "ffn.gate.e_score_correction_bias" in weights[0] and "ffn.gate.tid2eid" not in weights[0]
    harness.process_weights(vllm_config, layers)
    cpu_side = vllm_config, layers, steps.allocate_kv_caches(vllm_config, max_tokens=256, num_sequences=1), weights
    return cpu_side, _nvidia_twin(vllm_config, weights, num_sequences=1)


def test_nvidia_layers_are_flashmla_layers_with_the_cpu_ports_parameters(cpu_port):
    # Before process_weights (which packs and frees the CPU port's linear weights): same names, shapes, dtypes.
    vllm_config, _, _, weights = cpu_port
    nvidia = harness.build_nvidia_layers(harness.make_vllm_config(vllm_config.model_config.model), aux_streams=False)
    assert type(nvidia[0].attn).__name__ == "DeepseekV4FlashMLAAttention"
    for values, nvidia_layer in zip(weights, nvidia, strict=True):
        assert {name: (p.shape, p.dtype) for name, p in nvidia_layer.named_parameters()} == \
            {name: (v.shape, v.dtype) for name, v in values.items()}


# Measured, hash-routed layer 0 (prefill of 13, then 3 decode steps): per token 0.83-1.13% relative error, max
# |diff| 0.035-0.0625 at |x| <= 6.5; bias-routed, tokens clear of a routing near-tie: 0.83-2.1%.
# Both paths write the same fp8_ds_mla cache rows from bf16 kv computed in different GEMM orders, so a few e4m3
# values per 512-dim row round one fp8 ulp apart (6-12% of the value); through the softmax-weighted sum of the
# window's rows that alone is ~1% of the attention output. bf16 GEMM accumulation order and fp32 softmax order
# add a little. Bounds: 3x the measured relative error, and 0.25 (about 4 bf16 ulps at |x| ~ 6) per element.
RELATIVE_BOUND, ATOL = 3e-2, 0.25
# Bias routing picks the top 6 of 64 biased scores; where the 6th and 7th are closer than NEAR_TIE, the ~1%
# attention difference can swap an expert (measured: at a margin of 0.0047 one token's stream differed by 15%,
# tokens at 0.009-0.03 by 1-2%). Such tokens only need TIE_FLIP_BOUND (one of six experts replaced).
NEAR_TIE, TIE_FLIP_BOUND = 0.01, 0.3
NUM_EXPERTS_PER_TOKEN = harness.TINY_CONFIG["num_experts_per_tok"]
NVIDIA_CHUNKS = [13, 1, 1, 1]
LOWERED_FAMILIES = ("mhc", "kv_cache", "attention", "o_proj")


def _routing_margins(ffn_input: torch.Tensor, weights: dict[str, torch.Tensor], top_k: int) -> torch.Tensor:
    """Per token, how far the k-th biased routing score (sqrt(softplus(logit)) + bias) lies above the next."""
    logits = ffn_input.float() @ weights["ffn.gate.weight"].float().T
    scores = torch.sqrt(torch.nn.functional.softplus(logits)) + weights["ffn.gate.e_score_correction_bias"].float()
    top = scores.topk(top_k + 1, dim=-1).values
    return top[:, top_k - 1] - top[:, top_k]


def _compare_layer(cpu_side, cpu_sequence_index: int, nvidia_side, nvidia_sequence_index: int = 0, layer: int = 0,
                   chunks: list[int] = NVIDIA_CHUNKS, near_tie: float = 0.0) -> list:
    """One decoder layer of both sides over `chunks` (a prefill, then single-token decodes), the NVIDIA one compiled
    by dsv4_xpu (with Inductor) under cuda_compat("cpu"), compared step by step; returns the rewrite reports it
    made. With `near_tie` (bias routing), tokens whose CPU-port routing margin is below it only get a loose bound."""
    import dsv4_compile
    from tests.conftest import reports_since

    cpu_config, cpu_layers, cpu_setup, weights = cpu_side
    nvidia_config, nvidia_layers, nvidia_setup = nvidia_side
    tokens = _tokens(sum(chunks))
    stream = harness.residual_stream(tokens, 256, 4)
    only_this_layer = lambda name: name.startswith(f"model.layers.{layer}.")  # noqa: E731
    cpu_sequence = steps.new_sequence(cpu_setup, cpu_sequence_index)
    nvidia_sequence = steps.new_sequence(nvidia_setup, nvidia_sequence_index)
    ffn_inputs: list[torch.Tensor] = []
    hook = cpu_layers[layer].ffn.register_forward_pre_hook(lambda module, args: ffn_inputs.append(args[0].detach()))
    snapshot = dsv4_compile.all_reports()
    stack = nvidia_layers[layer:layer + 1]
    compiled = torch.compile(lambda x, p, i: harness.run_layers(stack, x, p, i), backend="dsv4_xpu")
    start, strict = 0, 0
    for size in chunks:
        rows = slice(start, start + size)
        with steps.forward_step(cpu_config, cpu_setup, cpu_sequence, size, only_this_layer) as positions:
            expected = harness.run_layers(cpu_layers[layer:layer + 1], stream[rows], positions, tokens[rows]).float()
        with dsv4_compile.cuda_compat("cpu"), \
                steps.forward_step(nvidia_config, nvidia_setup, nvidia_sequence, size, only_this_layer) as positions:
            actual = compiled(stream[rows], positions, tokens[rows]).float()
        clear = torch.ones(size, dtype=torch.bool)
        if near_tie:
            clear = _routing_margins(ffn_inputs[-1], weights[layer], NUM_EXPERTS_PER_TOKEN) >= near_tie
        error = (actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
        assert error.max() < TIE_FLIP_BOUND, f"step of {size} tokens at {start}: {error.tolist()}"
        if clear.any():
            assert (actual - expected)[clear].norm() / expected[clear].norm() < RELATIVE_BOUND, f"{size} at {start}"
            torch.testing.assert_close(actual[clear], expected[clear], rtol=0, atol=ATOL)
        strict += int(clear.sum())
        start += size
    hook.remove()
    assert strict >= 0.5 * start, f"only {strict} of {start} tokens compared strictly"
    return reports_since(snapshot)


def _assert_lowered(reports: list) -> None:
    assert reports and all(report["audit"].matched == 0 for report in reports)
    changed = {family: sum(r.get(family).changed for r in reports if r.get(family) is not None)
               for family in LOWERED_FAMILIES}
    # Prefill and decode each lower one cache insert, one attention and one o_proj; mhc pre/post per step.
    assert all(count >= 2 for count in changed.values()), changed


def test_nvidia_window_layer_prefill_then_decode_match_the_cpu_port(cpu_port, nvidia_port):
    # Layer 0 (window only, hash-routed MoE): a prefill (FlashMLA's sparse prefill over the window dequantised
    # from the cache) then single-token decodes (FlashMLA's sparse decode).
    _assert_lowered(_compare_layer(cpu_port, 4, nvidia_port))


def test_nvidia_bias_routed_window_layer_prefill_then_decode_match_the_cpu_port(bias_routed_pair):
    cpu_side, nvidia_side = bias_routed_pair
    _assert_lowered(_compare_layer(cpu_side, 0, nvidia_side, near_tie=NEAR_TIE))


# Measured (Inductor; prefill, then 3 decode steps): ratio 4 (prefill of 20) per token 0.7-1.25%, max |diff| 0.078
# at |x| <= 6.6; ratio 128 (prefill of 130, so one compressed entry) tokens clear of a routing near-tie 0.6-0.8%,
# max |diff| 0.0625 at |x| <= 7.2, while 3 of its 22 near-tie tokens (margin < NEAR_TIE) swap an expert: 12-16.5%.
COMPRESSED_CHUNKS = {1: [20, 1, 1, 1], 2: [130, 1, 1, 1]}


@pytest.mark.parametrize("layer", [1, 2], ids=["ratio4_indexer", "ratio128"])
def test_nvidia_compressed_layer_prefill_then_decode_match_the_cpu_port(cpu_port, nvidia_port, layer):
    # The layer's caches (fp32 compressor states, uint8 FP8 rows) are views of vLLM's one KV-cache buffer: graph
    # inputs aliasing with different dtypes, which the backend merges before Inductor.
    reports = _compare_layer(cpu_port, 4 + layer, nvidia_port, layer, layer, chunks=COMPRESSED_CHUNKS[layer],
                             near_tie=NEAR_TIE)
    _assert_lowered(reports)
