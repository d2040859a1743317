"""vLLM's per-step attention-metadata counts, traced as symbolic ints instead of constants.

vLLM's attention code reads Python ints off the step's metadata (`get_forward_context().attn_metadata[prefix]`):
`max_seq_len`, `num_decodes`, `num_decode_tokens`, ... Dynamo specialises every int reached from a global and
guards on its value, so each decode step (one more token in `max_seq_len`, attention.py:1086 in vLLM 0.32.0)
and each new batch size recompiles the attention frames, until the recompile limit. Inside the block these
fields are on torch's `dynamic_sources` list, Dynamo's own switch for ints that must stay symbolic: a guard
then holds for a range (`s0 // 4 <= 512`), not a value. 0 and 1 are still specialised, as for every dynamic
size: a step without prefills, and a batch of one, keep graphs of their own.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

# Counts that change from step to step in vLLM's attention metadata (sizes of the batch and of the sequences);
# block sizes and prefixes stay constants.
PER_STEP_COUNTS = ("max_seq_len", "max_query_len", "num_reqs", "num_actual_tokens", "num_decodes",
                   "num_decode_tokens", "num_prefills", "num_prefill_tokens")
# A source name as Dynamo spells it: `G['__import_vllm_dot_forward_context']._forward_context.attn_metadata[
# 'model.layers.1.attn.indexer.k_cache'].max_seq_len` (re.match: anchored at the start only).
METADATA_COUNT_SOURCES = r".*\.attn_metadata\[[^\]]+\]\.(?:" + "|".join(PER_STEP_COUNTS) + r")$"


@contextlib.contextmanager
def dynamic_step_metadata() -> Iterator[None]:
    """Inside the block, where vLLM's forward context is loaded, Dynamo traces PER_STEP_COUNTS of the step's
    attention metadata as symbolic ints; elsewhere (or on a torch without `dynamic_sources`) nothing."""
    config = torch.compiler.config
    if "vllm.forward_context" not in sys.modules or not hasattr(config, "dynamic_sources"):
        yield
        return
    current = config.dynamic_sources
    if METADATA_COUNT_SOURCES in current.split(","):
        yield
        return
    config.dynamic_sources = ",".join(filter(None, (current, METADATA_COUNT_SOURCES)))
    try:
        yield
    finally:
        config.dynamic_sources = current
