"""Build vLLM's own DeepSeek-V4 decoder layers on CPU and drive them through prefill and decode steps.

The layers come from the installed vLLM, unmodified: the CPU port (`vllm.models.deepseek_v4.cpu.model`) and the
NVIDIA path (`vllm.models.deepseek_v4.nvidia.model`). Everything around them is done the way vLLM's worker does
it: a Hugging Face config.json in a folder -> ModelConfig -> VllmConfig, a world-size-1 process group, the layers
built under `set_current_vllm_config` with the model dtype as default dtype, KV caches laid out from each layer's
own KVCacheSpec by vLLM's allocator and bound by vLLM's `bind_kv_cache`, attention metadata built by each cache
layer's own metadata builder and installed with `set_forward_context`.

Process-wide effects (a test module using this must run in a pytest process of its own, as tests/vllm_real does):
- `import vllm.v1.worker.cpu.shm` (what vLLM's CPU worker imports first, cpu_worker.py:5) replaces
  torch.cuda.Event/Stream with no-op placeholders; the CPU port needs them at construction (attention.py:330);
- a world-size-1 gloo process group, vLLM's model-parallel groups and its workspace manager, created once;
- `register_kernels` (vLLM's own Triton-override registry) gets plain-torch versions of the metadata kernels the
  builders launch (the stand-ins at the end of this module), because this CPU build has no Triton.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "torch_dtype": "bfloat16",
    "vocab_size": 256,
    "hidden_size": 256,
    # Layer 0: window only and hash-routed; 1: ratio 4 (compressor + indexer); 2: ratio 128. The trailing entry
    # is the multi-token-prediction layer's, as in the published configs.
    "num_hidden_layers": 3,
    "compress_ratios": [0, 4, 128, 0],
    "num_hash_layers": 1,
    # The kernels fix these: the fp8_ds_mla cache row is 448 fp8 + 64 bf16 rope dims (head_dim 512, rope 64),
    # the indexer cache row is 128 fp8 + a scale, and the CPU top-k kernel is the 512-wide one.
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "q_lora_rank": 128,
    "o_lora_rank": 128,
    "o_groups": 8,
    "index_n_heads": 8,
    "sliding_window": 128,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 4096,
    # vLLM's CPU routing kernels (hash_topk_cpu, biased_topk_cpu) take 64, 128, 256 or 384 experts, top-6 or 8.
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

MAX_MODEL_LEN = 1024
MAX_NUM_BATCHED_TOKENS = 1024
MAX_NUM_SEQS = 4


def write_tiny_config(folder: str | Path, **overrides: Any) -> Path:
    """Write a tiny DeepSeek-V4 `config.json` (the checkpoint's field names) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}, indent=1))
    return folder


def make_vllm_config(model_folder: str | Path, cache_dtype: str = "fp8", **engine: Any) -> Any:
    """ModelConfig -> VllmConfig for a model folder, eager (no torch.compile, no CUDA graphs), CPU platform."""
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    model_config = ModelConfig(model=str(model_folder), tokenizer=None, skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0)
    scheduler_config = SchedulerConfig(max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, max_num_seqs=MAX_NUM_SEQS,
                                       max_model_len=MAX_MODEL_LEN, is_encoder_decoder=False)
    return VllmConfig(model_config=model_config, cache_config=CacheConfig(cache_dtype=cache_dtype),
                      scheduler_config=scheduler_config, **engine)


_DISTRIBUTED_READY: list[bool] = []


def init_single_process_distributed(vllm_config: Any) -> None:
    """vLLM's world-size-1 process group (gloo), model-parallel groups and workspace manager; once per process."""
    if _DISTRIBUTED_READY:
        return
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    rendezvous = Path(tempfile.mkdtemp()) / "rendezvous"
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{rendezvous}")
        initialize_model_parallel(1, 1)
        # The worker does this next (gpu_worker.py:551); the NVIDIA prefill path takes its buffers from it.
        from vllm.v1.worker.workspace import init_workspace_manager

        init_workspace_manager(torch.device("cpu"))
    _DISTRIBUTED_READY.append(True)


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}"


def build_decoder_layers(vllm_config: Any, layer_cls: type, **layer_kwargs: Any) -> list[torch.nn.Module]:
    """Every decoder layer of the config, built as vLLM's model loader builds modules: under the current
    VllmConfig, with the model dtype as default dtype, on CPU. Weights are uninitialised (see fill_weights)."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = vllm_config.model_config.hf_config
    topk_indices_buffer = torch.full((MAX_NUM_BATCHED_TOKENS, config.index_topk), -1, dtype=torch.int32)
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(vllm_config.model_config.dtype):
        return [layer_cls(vllm_config, prefix=layer_prefix(i), topk_indices_buffer=topk_indices_buffer, **layer_kwargs)
                for i in range(config.num_hidden_layers)]


def build_cpu_port_layers(vllm_config: Any) -> list[torch.nn.Module]:
    """vLLM's CPU-port decoder layers (DeepseekV4CPUAttention), as the CPU worker builds them."""
    import vllm.v1.worker.cpu.shm  # noqa: F401 - see the module docstring
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4DecoderLayer

    return build_decoder_layers(vllm_config, DeepseekV4DecoderLayer)


@contextmanager
def cuda_capability(major: int = 9, minor: int = 0) -> Iterator[None]:
    """The CPU platform answers `get_device_capability()` with `major.minor` inside the block (it answers
    None). The NVIDIA attention asks while it is built: nvidia/ops/o_proj.py:28-29 asserts it is not None, and
    nvidia/model.py:1022-1045 picks FlashMLA for any major but 12 (12 picks FlashInfer SM120)."""
    from unittest import mock

    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    def capability(cls: type, device_id: int = 0) -> DeviceCapability:
        return DeviceCapability(major, minor)

    with mock.patch.object(type(current_platform), "get_device_capability", classmethod(capability)):
        yield


def build_nvidia_layers(vllm_config: Any, aux_streams: bool = True) -> list[torch.nn.Module]:
    """vLLM's NVIDIA decoder layers (FlashMLA attention), built under `cuda_compat("cpu")` with an SM90
    capability answer. With `aux_streams`, the three aux streams DeepseekV4Model gives its layers
    (nvidia/model.py:1321), made inside cuda_compat. Their linear layers keep their raw weights (see
    keep_raw_linear_weights)."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4DecoderLayer

    import dsv4_compile

    with dsv4_compile.cuda_compat("cpu"), cuda_capability():
        streams = [torch.cuda.Stream() for _ in range(3)] if aux_streams else None
        layers = build_decoder_layers(vllm_config, DeepseekV4DecoderLayer, aux_stream_list=streams)
    keep_raw_linear_weights(layers)
    return layers


def keep_raw_linear_weights(layers: Iterable[torch.nn.Module]) -> None:
    """On a CPU platform vLLM's unquantized linear method packs each weight for its CPU GEMM and frees it
    (model_executor/layers/linear.py:207-216), but the NVIDIA attention reads some weights directly
    (attention.py:714, `indexer.compressor.fused_wkv_wgate.weight.T`). vLLM's own opt-out flag, the one MLA sets
    on kv_b_proj (mla_attention.py:606), keeps the weight and makes the layer call F.linear."""
    from vllm.model_executor.layers.linear import LinearBase

    for layer in layers:
        for module in layer.modules():
            if isinstance(module, LinearBase):
                module._cpu_skip_gemm_dispatch = True


def _random_value(name: str, param: torch.Tensor, generator: torch.Generator, num_experts: int) -> torch.Tensor:
    """A plausible random value for a DeepSeek-V4 parameter, chosen by its name."""
    shape, leaf = param.shape, name.rsplit(".", 1)[-1]
    if param.dtype in (torch.int32, torch.int64):  # tid2eid: token id -> experts
        return torch.randint(0, num_experts, shape, generator=generator, dtype=param.dtype)
    normal = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        value = 1.0 + 0.1 * normal
    elif leaf == "attn_sink" or leaf == "e_score_correction_bias":
        value = 0.5 * normal
    elif leaf.endswith("_scale") and name.split(".")[-1].startswith("hc_"):
        value = 0.5 + 0.1 * normal
    elif leaf.startswith("hc_") and leaf.endswith("_base"):
        value = 0.1 * normal
    elif leaf == "ape":
        value = 0.1 * normal
    else:  # projections: keep activations O(1)
        value = normal / max(1, shape[-1]) ** 0.5
    return value.to(param.dtype)


def fill_weights(layer: torch.nn.Module, seed: int,
                 num_experts: int = TINY_CONFIG["n_routed_experts"]) -> dict[str, torch.Tensor]:
    """Fill every parameter of `layer` with seeded random values; returns them by name (vLLM's names)."""
    values = {}
    for name, param in layer.named_parameters():
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        values[name] = _random_value(name, param, generator, num_experts)
        with torch.no_grad():
            param.copy_(values[name])
    return values


def copy_weights(values: dict[str, torch.Tensor], layer: torch.nn.Module,
                 rename: Callable[[str], str] = lambda n: n) -> list[str]:
    """Copy `values` into `layer`'s parameters by (renamed) name; returns the layer's names that got nothing.
    A longer first dimension (attn_sink padded to more q heads) gets the values in its leading rows."""
    missing = []
    for name, param in layer.named_parameters():
        source = values.get(rename(name))
        if source is None:
            missing.append(name)
            continue
        with torch.no_grad():
            param[: source.shape[0]].copy_(source.to(param.dtype))
    return missing


def process_weights(vllm_config: Any, layers: Iterable[torch.nn.Module]) -> None:
    """vLLM's post-load step (quant methods repack, attention layers cache fp32 tables)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    container = torch.nn.ModuleList(layers)
    with set_current_vllm_config(vllm_config):
        process_weights_after_loading(container, vllm_config.model_config, torch.device("cpu"))


@dataclass
class CacheSetup:
    """The KV caches of a set of layers, as vLLM's worker lays them out, and the builders of their metadata."""

    kv_cache_config: Any
    kv_caches: dict[str, torch.Tensor]
    max_tokens: int
    num_sequences: int
    # per cache group: (its spec, its layer names, its vLLM AttentionGroups, each with its metadata builder)
    groups: list[tuple[Any, list[str], list[Any]]] = field(default_factory=list)


def attention_layers(vllm_config: Any) -> dict[str, Any]:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    return get_layers_from_vllm_config(vllm_config, AttentionLayerBase)


def _complete_tile_scheduler_keys(builder: Any) -> None:
    """vLLM 0.32.0's CPU SWA builder returns tile-scheduler entries for swaonly/c4a/c128a only
    (models/deepseek_v4/cpu/cpu_mla.py:118-126) while the shared build() also reads c1a and c2a
    (v1/attention/backends/mla/sparse_swa.py:780-781): KeyError 'c1a' on every build. Add the missing entries,
    as None (what the CPU builder means: no tile scheduler), on this builder instance only."""
    from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder

    if not isinstance(builder, DeepseekV4CPUSparseSWAMetadataBuilder):
        return
    plan = builder.build_tile_scheduler

    def complete_plan(num_decode_tokens: int) -> dict[str, Any]:
        return {"c1a": None, "c2a": None, **plan(num_decode_tokens)}

    builder.build_tile_scheduler = complete_plan


def allocate_kv_caches(vllm_config: Any, max_tokens: int = 256, num_sequences: int = 4) -> CacheSetup:
    """KV caches for every attention-like layer registered in the config's static forward context, with room
    for `num_sequences` sequences of up to `max_tokens` tokens, laid out and bound as vLLM's worker does it
    (get_kv_cache_spec -> get_kv_cache_groups -> allocate_kv_cache -> bind_kv_cache), plus the model runner's
    AttentionGroups with their metadata builders."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.utils import (
        get_supported_kv_cache_layouts,
        record_kv_cache_layout,
        resolve_kv_cache_layout,
    )
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
    from vllm.v1.worker.utils import AttentionGroup, allocate_kv_cache, bind_kv_cache

    layers = attention_layers(vllm_config)
    with set_current_vllm_config(vllm_config):
        specs = {name: spec for name, layer in layers.items()
                 if (spec := layer.get_kv_cache_spec(vllm_config)) is not None}
        # What the engine core does once (core.py: resolve_kv_cache_layout, then set_kv_cache_layout).
        backends = {layers[name].get_attn_backend() for name in specs}
        supported = [layout.name for layout in get_supported_kv_cache_layouts(backends)]
        layout = resolve_kv_cache_layout(vllm_config, [supported], specs.values())
        record_kv_cache_layout(vllm_config.cache_config, layout.name)
        groups = get_kv_cache_groups(vllm_config, specs)
        # The cache groups overlay one block pool (allocate_kv_cache), so every group of every sequence needs
        # block ids of its own, as vLLM's BlockPool hands out; the kernels do not bounds-check block ids.
        needed = 1 + num_sequences * sum(-(-max_tokens // g.kv_cache_spec.block_size) for g in groups)
        page_bytes = max(g.kv_cache_spec.page_size_bytes for g in groups)
        memory = page_bytes * needed
        while (config := get_kv_cache_config_from_groups(vllm_config, groups, memory)).num_blocks < needed:
            memory *= 2
        layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
        kv_caches = allocate_kv_cache(config, torch.device("cpu"), layout)
        runner_caches: list[torch.Tensor] = []
        bind_kv_cache(kv_caches, vllm_config.compilation_config.static_forward_context, runner_caches,
                      kv_cache_groups=config.kv_cache_groups)
        setup = CacheSetup(config, kv_caches, max_tokens, num_sequences)
        for group_id, group in enumerate(config.kv_cache_groups):
            # As the model runner forms its attention groups: one per (backend, layer spec) in a cache group.
            by_backend: dict[tuple[type, Any], list[str]] = {}
            for name in group.layer_names:
                by_backend.setdefault((layers[name].get_attn_backend(), specs[name]), []).append(name)
            attention_groups = []
            for (backend, spec), names in by_backend.items():
                attention_group = AttentionGroup(backend, names, spec, group_id)
                attention_group.create_metadata_builders(vllm_config, torch.device("cpu"))
                for builder in attention_group.metadata_builders:
                    _complete_tile_scheduler_keys(builder)
                attention_groups.append(attention_group)
            setup.groups.append((group.kv_cache_spec, group.layer_names, attention_groups))
    return setup


@dataclass
class Sequence:
    """One request's KV blocks (a block-table row per cache group) and how many of its tokens are cached."""

    block_ids: list[torch.Tensor]
    num_computed: int = 0


def new_sequence(setup: CacheSetup, index: int = 0) -> Sequence:
    """Block-table rows for request number `index` (< setup.num_sequences): in each cache group, a run of block
    ids no other group or sequence uses (the groups share one block pool), after vLLM's null block 0, enough
    for setup.max_tokens tokens."""
    if not 0 <= index < setup.num_sequences:
        raise ValueError(f"sequence index {index} outside the {setup.num_sequences} the caches were sized for")
    from vllm.v1.worker.block_table import get_block_table_width

    counts = [-(-setup.max_tokens // spec.block_size) for spec, _, _ in setup.groups]
    next_block = 1 + index * sum(counts)
    rows = []
    for (spec, _, _), count in zip(setup.groups, counts, strict=True):
        # As the worker's block table: a row as wide as max_model_len needs, unused entries on the null block
        # (the CPU kernels read masked entries too).
        row = torch.zeros(get_block_table_width(-(-MAX_MODEL_LEN // spec.block_size), spec.block_size),
                          dtype=torch.int32)
        row[:count] = torch.arange(next_block, next_block + count, dtype=torch.int32)
        next_block += count
        rows.append(row)
    return Sequence(rows)


def common_metadata(sequence: Sequence, group: int, block_size: int, num_new: int) -> Any:
    """vLLM's CommonAttentionMetadata for one request that appends `num_new` tokens, for one cache group."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    start = sequence.num_computed
    positions = torch.arange(start, start + num_new, dtype=torch.int64)
    block_table = sequence.block_ids[group].unsqueeze(0)
    if (start + num_new + block_size - 1) // block_size > int((block_table[0] > 0).sum()):
        raise ValueError(f"{start + num_new} tokens do not fit the blocks of cache group {group}")
    slot_mapping = (block_table[0, positions // block_size].to(torch.int64) * block_size + positions % block_size)
    seq_len = start + num_new
    query_start_loc = torch.tensor([0, num_new], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(), seq_lens=seq_lens,
        num_reqs=1, num_actual_tokens=num_new, max_query_len=num_new, max_seq_len=seq_len,
        block_table_tensor=block_table, slot_mapping=slot_mapping, positions=positions,
        seq_lens_cpu_upper_bound=seq_lens.clone(), is_prefilling=torch.tensor([start == 0]),
    )


def build_attention_metadata(setup: CacheSetup, sequence: Sequence, num_new: int,
                             only: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """Per-layer attention metadata for the next `num_new` tokens of `sequence`, from each attention group's
    builder (only the groups holding a layer for which `only` is true)."""
    metadata: dict[str, Any] = {}
    for group, (spec, _, attention_groups) in enumerate(setup.groups):
        wanted = [g for g in attention_groups if any(map(only, g.layer_names))]
        if not wanted:
            continue
        common = common_metadata(sequence, group, spec.block_size, num_new)
        for attention_group in wanted:
            built = attention_group.build_metadata(common)
            metadata.update(dict.fromkeys(attention_group.layer_names, built))
    return metadata


@contextmanager
def forward_step(vllm_config: Any, setup: CacheSetup, sequence: Sequence, num_new: int,
                 only: Callable[[str], bool] = lambda name: True) -> Iterator[torch.Tensor]:
    """vLLM's forward context for the next `num_new` tokens of `sequence`; yields their positions and, on a
    clean exit, counts them as cached."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    metadata = build_attention_metadata(setup, sequence, num_new, only)
    positions = torch.arange(sequence.num_computed, sequence.num_computed + num_new, dtype=torch.int64)
    with set_current_vllm_config(vllm_config), set_forward_context(metadata, vllm_config, num_tokens=num_new):
        yield positions
    sequence.num_computed += num_new


def residual_stream(token_ids: torch.Tensor, hidden_size: int, hc_mult: int, seed: int = 0) -> torch.Tensor:
    """The decoder's input for `token_ids`: a fixed random embedding per token id, repeated over the hc_mult
    streams as DeepseekV4Model.forward does; [tokens, hc_mult, hidden] bf16."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(int(TINY_CONFIG["vocab_size"]), hidden_size, generator=generator)
    return table[token_ids].to(torch.bfloat16).unsqueeze(-2).repeat(1, hc_mult, 1)


def run_layers(layers: Iterable[torch.nn.Module], x: torch.Tensor, positions: torch.Tensor,
               token_ids: torch.Tensor) -> torch.Tensor:
    """The decoder stack on the residual stream x ([tokens, hc_mult, hidden]), each layer's own forward, then
    what DeepseekV4Model.forward does after its last layer: with the fused hc path (the NVIDIA layers, the CPU
    port only with tilelang), the last layer leaves its hc_post to the model (cpu/model.py: layer.hc_post;
    nvidia/model.py:1497: mhc_post_tilelang, looked up at call time so that cuda_compat's substitute is used).
    Returns the finished stream. Compile this whole function to compile what the model compiles."""
    from vllm.model_executor.kernels.mhc import tilelang

    post_mix = res_mix = residual = None
    layer = None
    for layer in layers:
        x, residual, post_mix, res_mix = layer(x, positions, token_ids, post_mix, res_mix, residual)
    if layer is not None and residual is not None:
        hc_post = getattr(layer, "hc_post", None) or tilelang.mhc_post_tilelang
        x = hc_post(x, residual, post_mix, res_mix)
    return x


# --- plain-torch stand-ins for the Triton kernels vLLM's metadata builders launch -------------------------------
# vLLM's CPU build expects triton-cpu for these (platforms/cpu.py warns "triton-cpu is expected on x86 CPUs");
# without it they are placeholders. Each stand-in is written from the kernel's contract (its arguments, in the
# kernel's own order, are what vLLM's `register_kernels` forwards), covering the one-request, no-image, no-replay,
# no-context-parallel cases this harness builds; it fills the same output buffers the kernel fills.

def _token_request_mapping(query_start_loc, output, num_reqs, num_mapped, num_tokens, **launch: Any) -> None:
    tokens = torch.arange(output.shape[0] if num_tokens is None else num_tokens)
    ends = query_start_loc[1: num_reqs + 1].to(torch.int64)
    requests = torch.searchsorted(ends, tokens, right=True).clamp(max=num_reqs - 1)
    output[: tokens.shape[0]] = torch.where(tokens < num_mapped, requests, 0).to(output.dtype)


def _prefill_gather_lens(gather_lens, seq_lens, query_start_loc, replay_start, num_prefills, num_decodes,
                         window_size, block_size) -> None:
    rows = slice(num_decodes, num_decodes + num_prefills)
    query_lens = query_start_loc[num_decodes + 1: num_decodes + num_prefills + 1] - query_start_loc[rows]
    visible_prefix = (seq_lens[rows] - query_lens - replay_start[rows]).clamp(min=0)
    gather_lens[:num_prefills] = (query_lens + visible_prefix.clamp(max=window_size - 1)).to(gather_lens.dtype)


def _swa_indices_and_lens(swa_indices, indices_stride, swa_lens, window_size, index_width, left_visible,
                          right_visible, query_start_loc, seq_lens, token_to_req, is_valid_token, block_table,
                          block_table_stride, block_size, replay_start, token_offset, has_image, triton_block) -> None:
    """Row r (token token_offset + r): the cache slots of its causal window, -1 padded; its window length."""
    assert not has_image, "image spans are not built by this harness"
    rows = min(swa_lens.shape[0], is_valid_token.shape[0] - token_offset)
    tokens = torch.arange(token_offset, token_offset + rows)
    requests = token_to_req[tokens].to(torch.int64)
    query_lens = query_start_loc[requests + 1] - query_start_loc[requests]
    positions = (seq_lens[requests] - query_lens + tokens - query_start_loc[requests]).to(torch.int64)
    starts = torch.maximum((positions - (window_size - 1)).clamp(min=0), replay_start[requests].to(torch.int64))
    lengths = positions + 1 - starts
    offsets = torch.arange(index_width)
    window = starts[:, None] + offsets
    inside = offsets < lengths[:, None]
    blocks = block_table[requests[:, None], (window // block_size).clamp(max=block_table.shape[1] - 1)]
    slots = torch.where(inside, blocks.to(torch.int64) * block_size + window % block_size, -1)
    valid = is_valid_token[tokens]
    swa_indices.view(-1, indices_stride)[:rows, :index_width] = torch.where(valid[:, None], slots, -1).to(
        swa_indices.dtype)
    swa_lens[:rows] = torch.where(valid, lengths, 0).to(swa_lens.dtype)


def _compressed_slot_mapping(compressed, slot_mapping, query_start_loc, seq_lens, block_table, block_table_stride,
                             block_size, dcp_world_size, cp_interleave, ratio, pad_id, triton_block) -> None:
    """The last token of every `ratio` consecutive positions writes its compressed state's slot; others pad."""
    assert dcp_world_size == 1
    for request in range(query_start_loc.shape[0] - 1):
        first, end = int(query_start_loc[request]), int(query_start_loc[request + 1])
        positions = int(seq_lens[request]) - (end - first) + torch.arange(end - first)
        states = positions // ratio
        slots = block_table[request, states // block_size].to(torch.int64) * block_size + states % block_size
        valid = ((positions + 1) % ratio == 0) & (slot_mapping[first:end] != pad_id)
        compressed[first:end] = torch.where(valid, slots, pad_id).to(compressed.dtype)


def _prefill_chunk_metadata(query_start_loc, seq_lens, cu_compressed_lens, row_starts, token_to_seq, starts, ends,
                            slice_start, slice_stop, dcp_rank, dcp_world, dcp_interleave, block, ratio) -> None:
    """Per query token: the [start, end) row range of its request's visible compressed entries; per compressed
    entry: its request."""
    assert dcp_world == 1
    for request in range(seq_lens.shape[0]):
        first, end = int(query_start_loc[request]), int(query_start_loc[request + 1])
        offsets = torch.arange(end - first)
        visible = (int(seq_lens[request]) - (end - first) + 1 + offsets) // ratio
        keep = (first + offsets >= slice_start) & (first + offsets < slice_stop)
        out = first + offsets[keep] - slice_start
        starts[out] = int(row_starts[request])
        ends[out] = (int(row_starts[request]) + visible[keep]).to(ends.dtype)
        token_to_seq[int(cu_compressed_lens[request]): int(cu_compressed_lens[request + 1])] = request


METADATA_KERNELS: dict[str, Callable[..., None]] = {
    "vllm.v1.attention.ops.metadata._token_request_mapping_kernel": _token_request_mapping,
    "vllm.v1.attention.backends.mla.sparse_swa.ComputePrefillMetadataKernel.kernel": _prefill_gather_lens,
    "vllm.v1.attention.backends.mla.sparse_swa.ComputeSWAIndicesAndLensKernel.kernel": _swa_indices_and_lens,
    "vllm.v1.attention.backends.mla.compressor_utils.CompressedSlotMappingKernel.kernel": _compressed_slot_mapping,
    "vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.kernel": _prefill_chunk_metadata,
}


def register_metadata_kernels() -> None:
    """Give vLLM's metadata builders the plain-torch kernels above, through vLLM's own override registry."""
    from vllm.triton_utils import HAS_TRITON
    from vllm.triton_utils.dispatcher import _registry, register_kernels

    if not HAS_TRITON:
        register_kernels({name: impl for name, impl in METADATA_KERNELS.items() if name not in _registry})
