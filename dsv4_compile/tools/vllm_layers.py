"""Build vLLM's own DeepSeek-V4 decoder layers on CPU and drive them through prefill and decode steps.

The layers come from the installed vLLM, unmodified: the CPU port (`vllm.models.deepseek_v4.cpu.model`) and the
NVIDIA path (`vllm.models.deepseek_v4.nvidia.model`). Everything around them is done the way vLLM's worker does
it: a Hugging Face config.json in a folder -> ModelConfig -> VllmConfig, a world-size-1 process group, the layers
built under `set_current_vllm_config` with the model dtype as default dtype, weights loaded and post-processed as
the loader does. Their KV caches and forward contexts come from vllm_steps, the metadata kernels' stand-ins
from dsv4_compile.frontend.ops.vllm_metadata_kernels.

Process-wide effects (a process that uses this imports vLLM: tests/vllm_real runs in a pytest process of its own):
- `import vllm.v1.worker.cpu.shm` (what vLLM's CPU worker imports first, cpu_worker.py:5) replaces
  torch.cuda.Event/Stream with no-op placeholders; the CPU port needs them at construction (attention.py:330);
- a world-size-1 gloo process group, vLLM's model-parallel groups and its workspace manager, created once;
- `register_kernels` (vLLM's own Triton-override registry) gets plain-torch versions of the metadata kernels the
  builders launch (dsv4_compile.frontend.ops.vllm_metadata_kernels), because this CPU build has no Triton.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from dsv4_compile.tools.vllm_checkpoint import TINY_CONFIG, random_value, write_tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MAX_MODEL_LEN = 1024
MAX_NUM_BATCHED_TOKENS = 1024
MAX_NUM_SEQS = 4


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


def build_nvidia_layers(vllm_config: Any, aux_streams: bool = True) -> list[torch.nn.Module]:
    """vLLM's NVIDIA decoder layers (FlashMLA attention), built under `cuda_compat("cpu")`, where vLLM's
    platform answers the SM90 capability that picks FlashMLA (nvidia/model.py:1022-1045). With `aux_streams`,
    the three aux streams DeepseekV4Model gives its layers (nvidia/model.py:1321), made inside cuda_compat.
    Their linear layers keep their raw weights (see keep_raw_linear_weights)."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4DecoderLayer

    import dsv4_compile

    with dsv4_compile.cuda_compat("cpu"):
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


def fill_weights(layer: torch.nn.Module, seed: int,
                 num_experts: int = TINY_CONFIG["n_routed_experts"]) -> dict[str, torch.Tensor]:
    """Fill every parameter of `layer` with seeded random values; returns them by name (vLLM's names)."""
    values = {}
    for name, param in layer.named_parameters():
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        values[name] = random_value(name, param.shape, param.dtype, generator, num_experts)
        with torch.no_grad():
            param.copy_(values[name])
    return values


def tiny_stack(build: Callable[[Any], list[torch.nn.Module]], **config: Any) -> tuple[
        Any, list[torch.nn.Module], list[dict[str, torch.Tensor]]]:
    """The tiny config's decoder layers as `build` (build_cpu_port_layers, build_nvidia_layers) makes them, in this
    process's world-size-1 setup, with seeded random weights (layer i: seed 100 i), post-processed as vLLM's loader
    does, and the metadata kernels' stand-ins registered; `config` overrides the tiny config.
    Returns the VllmConfig, the layers and their weights."""
    from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels

    vllm_config = make_vllm_config(write_tiny_config(tempfile.mkdtemp(), **config))
    init_single_process_distributed(vllm_config)
    layers = build(vllm_config)
    weights = [fill_weights(layer, seed=100 * index) for index, layer in enumerate(layers)]
    process_weights(vllm_config, layers)
    register_metadata_kernels()
    return vllm_config, layers, weights


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
