"""A tiny random DeepSeek-V4 checkpoint for vLLM: config.json and model.safetensors with the checkpoint's names.

vLLM's real loader (its safetensors iterator, the model's `load_weights` and `hf_to_vllm_mapper`) reads it on
either path, so the NVIDIA path and the CPU port see the same weights. vLLM's dummy loader would not do: it gives
every tensor of one shape the same values and leaves integer tables (the hash-routing `tid2eid`) unset.

The tensors are found by building vLLM's own CPU-port model for the config (in a process of its own: building
it sets up vLLM's distributed state) and naming each of its parameters as the published checkpoints do (the
inverse of nvidia/model.py's `_make_deepseek_v4_weights_mapper` and `load_weights`' stacked entries), with a
seeded random value chosen by name. `python -m dsv4_compile.tools.vllm_checkpoint FOLDER` writes one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

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

# vLLM parameter name pieces -> the checkpoint's (the inverse of the model's weights mapper).
_PREFIXES = (("model.layers.", "layers."), ("model.norm.", "norm."), ("model.hc_head", "hc_head"),
             ("model.embed_tokens.weight", "embed.weight"), ("lm_head.weight", "head.weight"))
_PIECES = ((".ffn.gate.e_score_correction_bias", ".ffn.gate.bias"), (".shared_experts.down_proj", ".shared_experts.w2"))
# vLLM's fused projections -> the checkpoint tensors stacked in them, in order (load_weights' stacked entries).
_STACKED = {"gate_up_proj": ("w1", "w3"), "attn.fused_wqa_wkv": ("attn.wq_a", "attn.wkv"),
            "compressor.fused_wkv_wgate": ("compressor.wkv", "compressor.wgate")}
_ROUTED = ".ffn.experts.routed_experts."


def write_tiny_config(folder: str | Path, **overrides: Any) -> Path:
    """Write a tiny DeepSeek-V4 `config.json` (the checkpoint's field names) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}, indent=1))
    return folder


def random_value(name: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator,
                 num_experts: int) -> torch.Tensor:
    """A plausible random value for a DeepSeek-V4 parameter, chosen by its (vLLM or checkpoint) name."""
    leaf = name.rsplit(".", 1)[-1]
    if dtype in (torch.int32, torch.int64):  # tid2eid: token id -> experts
        return torch.randint(0, num_experts, shape, generator=generator, dtype=dtype)
    normal = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        value = 1.0 + 0.1 * normal
    elif leaf in ("attn_sink", "e_score_correction_bias", "bias"):
        value = 0.5 * normal
    elif leaf.startswith("hc_") and leaf.endswith("_scale"):
        value = 0.5 + 0.1 * normal
    elif leaf.startswith("hc_") and leaf.endswith("_base"):
        value = 0.1 * normal
    elif leaf == "ape":
        value = 0.1 * normal
    else:  # projections and embeddings: keep activations O(1)
        value = normal / max(1, shape[-1]) ** 0.5
    return value.to(dtype)


def checkpoint_tensors(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter of vLLM's DeepSeek-V4 model, under the checkpoint's names, with seeded random values."""
    num_experts = int(model.config.n_routed_experts)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        value = random_value(name, param.shape, param.dtype, generator, num_experts)
        for old, new in _PREFIXES + _PIECES:
            name = name.replace(old, new)
        if _ROUTED in name:  # [experts, 2 * inter, hidden] (w13) or [experts, hidden, inter] (w2)
            head, leaf = name.split(_ROUTED)
            for expert in range(value.shape[0]):
                parts = value[expert].chunk(2) if leaf.startswith("w13") else (value[expert],)
                for part, ckpt in zip(parts, ("w1", "w3") if leaf.startswith("w13") else ("w2",), strict=True):
                    tensors[f"{head}.ffn.experts.{expert}.{ckpt}.weight"] = part.contiguous()
            continue
        fused = next((key for key in _STACKED if f".{key}." in name), None)
        if fused is None:
            tensors[name] = value.contiguous()
            continue
        sizes = model.get_submodule(_vllm_module_of(model, param)).output_sizes
        for part, piece in zip(value.split(list(sizes)), _STACKED[fused], strict=True):
            tensors[name.replace(fused, piece)] = part.contiguous()
    return tensors


def _vllm_module_of(model: torch.nn.Module, param: torch.Tensor) -> str:
    return next(name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p is param)


def build_cpu_port_model(folder: Path) -> torch.nn.Module:
    """vLLM's CPU-port DeepSeek-V4 model for the config in `folder`, built as its loader builds it (weights unset)."""
    import tempfile

    import vllm.v1.worker.cpu.shm  # noqa: F401 - torch.cuda.Stream/Event placeholders, as the CPU worker sets
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = VllmConfig(model_config=ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16",
                                                 enforce_eager=True))
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
        initialize_model_parallel(1, 1)
        with set_default_torch_dtype(torch.bfloat16):
            return DeepseekV4ForCausalLM(vllm_config=config, prefix="")


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """config.json + model.safetensors for a tiny random DeepSeek-V4 in `folder` (in a subprocess)."""
    folder = write_tiny_config(folder, **overrides)
    subprocess.run([sys.executable, "-m", __name__, str(folder), "--seed", str(seed)], check=True,
                   env=_quiet_env())
    return folder


def _quiet_env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder holding config.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tensors = checkpoint_tensors(build_cpu_port_model(args.folder), args.seed)
    save_file(tensors, str(args.folder / "model.safetensors"))


if __name__ == "__main__":
    main()
