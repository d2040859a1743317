"""DeepSeek-V4: config, parameter modules (checkpoint names), the native plain-torch oracle and the
CUDA-oriented forward (``CudaDeepseekV4``, the rewrite targets)."""

from .cache import CompressorState, LayerCache, SequenceCache, new_cache
from .config import DeepseekV4Config
from .cuda_model import CudaDeepseekV4
from .cuda_ops import STAND_IN_KERNELS, cpu_reference_kernels
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
    "STAND_IN_KERNELS", "Attention", "Compressor", "CompressorState", "CudaDeepseekV4", "DecoderLayer",
    "DeepseekV4Config", "DeepseekV4Model", "Expert", "Gate", "Indexer", "LayerCache", "MoE", "RMSNorm",
    "SequenceCache", "cpu_reference_kernels", "load_safetensors", "model_forward", "new_cache", "new_caches",
    "oracle_decode", "oracle_prefill", "save_safetensors",
]
