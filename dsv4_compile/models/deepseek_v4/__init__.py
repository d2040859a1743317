"""DeepSeek-V4: config, parameter modules (checkpoint names) and the native plain-torch oracle."""

from .cache import CompressorState, LayerCache, SequenceCache, new_cache
from .config import DeepseekV4Config
from .modeling import (
    Attention,
    Compressor,
    DecoderLayer,
    DeepseekV4Model,
    Expert,
    Gate,
    Indexer,
    MoE,
    RMSNorm,
    load_safetensors,
    save_safetensors,
)
from .oracle import model_forward, new_caches, oracle_decode, oracle_prefill

__all__ = [
    "Attention", "Compressor", "CompressorState", "DecoderLayer", "DeepseekV4Config", "DeepseekV4Model",
    "Expert", "Gate", "Indexer", "LayerCache", "MoE", "RMSNorm", "SequenceCache", "load_safetensors",
    "model_forward", "new_cache", "new_caches", "oracle_decode", "oracle_prefill", "save_safetensors",
]
