"""vLLM's KV caches, per-request block tables and forward contexts for the decoder layers vllm_layers builds.

The caches are laid out from each layer's own KVCacheSpec by vLLM's allocator and bound by vLLM's
`bind_kv_cache`; attention metadata comes from each cache layer's own metadata builder and is installed with
`set_forward_context`, as vLLM's worker does it (one request per step, or a batch of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv4_compile.tools.vllm_layers import MAX_MODEL_LEN


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


def batch_metadata(batch: list[tuple[Sequence, int]], group: int, block_size: int) -> Any:
    """vLLM's CommonAttentionMetadata for a step in which each (request, count) of `batch` appends `count` tokens,
    for one cache group. Requests in the order the model runner puts them: decodes (one token) first."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    positions, slots, rows, seq_lens, query_lens = [], [], [], [], []
    for sequence, num_new in batch:
        start = sequence.num_computed
        new = torch.arange(start, start + num_new, dtype=torch.int64)
        row = sequence.block_ids[group]
        if (start + num_new + block_size - 1) // block_size > int((row > 0).sum()):
            raise ValueError(f"{start + num_new} tokens do not fit the blocks of cache group {group}")
        positions.append(new)
        slots.append(row[new // block_size].to(torch.int64) * block_size + new % block_size)
        rows.append(row)
        seq_lens.append(start + num_new)
        query_lens.append(num_new)
    query_start_loc = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc.clone(), seq_lens=lengths,
        num_reqs=len(batch), num_actual_tokens=sum(query_lens), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_table_tensor=torch.stack(rows), slot_mapping=torch.cat(slots),
        positions=torch.cat(positions), seq_lens_cpu_upper_bound=lengths.clone(),
        is_prefilling=torch.tensor([sequence.num_computed == 0 for sequence, _ in batch]),
    )


def build_attention_metadata(setup: CacheSetup, batch: list[tuple[Sequence, int]],
                             only: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """Per-layer attention metadata for a step of (sequence, new token count) pairs, from each attention group's
    builder (only the groups holding a layer for which `only` is true)."""
    metadata: dict[str, Any] = {}
    for group, (spec, _, attention_groups) in enumerate(setup.groups):
        wanted = [g for g in attention_groups if any(map(only, g.layer_names))]
        if not wanted:
            continue
        common = batch_metadata(batch, group, spec.block_size)
        for attention_group in wanted:
            built = attention_group.build_metadata(common)
            metadata.update(dict.fromkeys(attention_group.layer_names, built))
    return metadata


@contextmanager
def forward_step(vllm_config: Any, setup: CacheSetup, sequence: Sequence, num_new: int,
                 only: Callable[[str], bool] = lambda name: True) -> Iterator[torch.Tensor]:
    """vLLM's forward context for the next `num_new` tokens of `sequence`; yields their positions and, on a
    clean exit, counts them as cached."""
    with batch_step(vllm_config, setup, [(sequence, num_new)], only) as positions:
        yield positions


@contextmanager
def batch_step(vllm_config: Any, setup: CacheSetup, batch: list[tuple[Sequence, int]],
               only: Callable[[str], bool] = lambda name: True) -> Iterator[torch.Tensor]:
    """vLLM's forward context for a step of several requests ((sequence, new token count) pairs, decodes first);
    yields the positions of all their new tokens and, on a clean exit, counts them as cached."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    metadata = build_attention_metadata(setup, batch, only=only)
    positions = torch.cat([torch.arange(s.num_computed, s.num_computed + n, dtype=torch.int64) for s, n in batch])
    with set_current_vllm_config(vllm_config), set_forward_context(metadata, vllm_config,
                                                                   num_tokens=len(positions)):
        yield positions
    for sequence, num_new in batch:
        sequence.num_computed += num_new


class GraphCounter:
    """A backend: dsv4_xpu, counting the graphs it compiles (`compiled`) and the calls of them (`calls`)."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = options
        self.compiled = self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        from dsv4_compile.lowering.backend import dsv4_xpu

        self.compiled += 1
        run = dsv4_xpu(gm, example_inputs, self.options)

        def counted(*args: Any) -> Any:
            self.calls += 1
            return run(*args)

        return counted
