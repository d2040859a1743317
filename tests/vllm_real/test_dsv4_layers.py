"""vLLM's own DeepSeek-V4 CPU port (its decoder layers on its CPU kernels), built by dsv4_layers: the oracle
side of the NVIDIA-layer-on-CPU comparison. These tests check the harness, not our backend: the three-layer
stack (window only + hash routing, ratio 4 with indexer, ratio 128) runs a prefill and decode steps through
vLLM's caches and metadata builders, and tokens decoded one at a time agree with the same tokens prefilled."""

from __future__ import annotations

import tempfile

import pytest
import torch

from tests.vllm_real import dsv4_layers as harness

# 130 prompt tokens: the ratio-128 layer has a compressed entry from position 127 on, the ratio-4 layer 32 of them,
# and the 128-token window is full.
PROMPT = 130
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def cpu_port():
    folder = harness.write_tiny_config(tempfile.mkdtemp())
    vllm_config = harness.make_vllm_config(folder)
    harness.init_single_process_distributed(vllm_config)
    layers = harness.build_cpu_port_layers(vllm_config)
    weights = [harness.fill_weights(layer, seed=100 * index) for index, layer in enumerate(layers)]
    harness.process_weights(vllm_config, layers)
    harness.register_metadata_kernels()
    return vllm_config, layers, harness.allocate_kv_caches(vllm_config, max_tokens=256, num_sequences=5), weights


def _tokens(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(7))


def _run(cpu_port, token_ids: torch.Tensor, chunks: list[int], sequence_index: int,
         before_step=lambda step: None) -> torch.Tensor:
    vllm_config, layers, setup, _ = cpu_port
    config = vllm_config.model_config.hf_config
    stream = harness.residual_stream(token_ids, config.hidden_size, config.hc_mult)
    sequence = harness.new_sequence(setup, sequence_index)
    outputs, start = [], 0
    for step, size in enumerate(chunks):
        before_step(step)
        with harness.forward_step(vllm_config, setup, sequence, size) as positions:
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

@pytest.fixture(scope="module")
def nvidia_port(cpu_port):
    """vLLM's NVIDIA decoder layers holding the CPU port's weights, under a VllmConfig of their own (both
    register the same layer names in their config's static forward context)."""
    vllm_config, _, _, weights = cpu_port
    nvidia_config = harness.make_vllm_config(vllm_config.model_config.model)
    layers = harness.build_nvidia_layers(nvidia_config)
    for values, layer in zip(weights, layers, strict=True):
        assert harness.copy_weights(values, layer) == []
    harness.process_weights(nvidia_config, layers)
    return nvidia_config, layers, harness.allocate_kv_caches(nvidia_config, max_tokens=256, num_sequences=2)


def test_nvidia_layers_are_flashmla_layers_with_the_cpu_ports_parameters(cpu_port):
    # Before process_weights (which packs and frees the CPU port's linear weights): same names, shapes, dtypes.
    vllm_config, _, _, weights = cpu_port
    nvidia = harness.build_nvidia_layers(harness.make_vllm_config(vllm_config.model_config.model), aux_streams=False)
    assert type(nvidia[0].attn).__name__ == "DeepseekV4FlashMLAAttention"
    for values, nvidia_layer in zip(weights, nvidia, strict=True):
        assert {name: (p.shape, p.dtype) for name, p in nvidia_layer.named_parameters()} == \
            {name: (v.shape, v.dtype) for name, v in values.items()}


@pytest.mark.xfail(reason="needs, in cuda_compat: the Dynamo fix for attribute reads of vLLM parameters under "
                          "RetargetCudaMode, substitutes for fused_q_kv_rmsnorm and get_mla_metadata "
                          "(/work/notes/layer_harness.md)", strict=False)
def test_nvidia_window_layer_decode_matches_the_cpu_port(cpu_port, nvidia_port):
    # Token by token from position 0, every step is a decode (query length 1), so only FlashMLA's sparse decode
    # runs. Both paths write the fp8_ds_mla cache format, but a few fp8 values per row round one ulp apart (an
    # fp8 ulp is 6-12% of the value), which alone makes ~1% of the attention output; bf16 GEMM order and the MoE
    # kernels add a little. Measured with the fixes applied: relative error 1.0-1.4%, max |diff| 0.08 at |x| ~ 5.
    import dsv4_compile

    cpu_config, cpu_layers, cpu_setup, _ = cpu_port
    nvidia_config, nvidia_layers, nvidia_setup = nvidia_port
    tokens = _tokens(6)
    stream = harness.residual_stream(tokens, 256, 4)
    only_layer0 = lambda name: name.startswith("model.layers.0.")  # noqa: E731
    cpu_sequence = harness.new_sequence(cpu_setup, 4)
    nvidia_sequence = harness.new_sequence(nvidia_setup, 0)
    compiled = torch.compile(lambda x, p, i: harness.run_layers(nvidia_layers[:1], x, p, i), backend="dsv4_xpu")
    for t in range(tokens.shape[0]):
        with harness.forward_step(cpu_config, cpu_setup, cpu_sequence, 1, only_layer0) as positions:
            expected = harness.run_layers(cpu_layers[:1], stream[t:t + 1], positions, tokens[t:t + 1]).float()
        with dsv4_compile.cuda_compat("cpu"), \
                harness.forward_step(nvidia_config, nvidia_setup, nvidia_sequence, 1, only_layer0) as positions:
            actual = compiled(stream[t:t + 1], positions, tokens[t:t + 1]).float()
        assert (actual - expected).norm() / expected.norm() < 3e-2
        torch.testing.assert_close(actual, expected, rtol=0, atol=0.25)
