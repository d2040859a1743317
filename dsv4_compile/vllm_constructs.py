"""Every CUDA-only construct of vLLM's NVIDIA DeepSeek-V4 path, and what dsv4_compile does with it per target.

One row per construct: a registered op (`namespace::name`, or a pattern of names), a Python entry point
(`module.function`, the name vLLM calls it by), a Triton kernel, or a torch/platform call. What is derived from
this table, so that following a vLLM release is an edit here:
  - the audit's known lists (`cuda_only_op_patterns`): ops that report a kernel for the target but need CUDA;
  - cuda_compat's trace-time swaps (`entry_point_substitutes`): entry point -> the project's replacement;
  - the metadata-kernel stand-ins registered in vLLM's own kernel registry (`metadata_kernel_standins`);
  - the README table (`markdown_table`; tests/test_vllm_constructs.py fails when the two disagree);
  - `dsv4-compile coverage`'s verdict on each construct a captured vLLM layer calls.
The rows name implementations as "module:attribute" under dsv4_compile.frontend.ops; nothing is imported here.
Line numbers are vLLM 0.33.0's (`nvidia/` is vllm/models/deepseek_v4/nvidia/).
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

TARGETS = ("cpu", "xpu", "cuda")


class Handling(str, Enum):
    LOWERED = "native lowering"  # the op's registered lowering rewrites it (lowering/lowerings/)
    SUBSTITUTED = "substituted while tracing"  # cuda_compat swaps the entry point for `impl`
    STAND_IN = "plain-torch stand-in"  # a target without Triton: `impl` runs instead of the Triton launch
    TRITON = "Triton, PDL off"  # kept as the user's Triton kernel; the pdl pass turns PDL off
    ANSWERED = "answered while tracing"  # a platform query answered for the lowered path
    REMOVED = "removed"  # streams and events: the aux_streams pass
    REFUSED = "refused"  # no lowering: the strict audit (or the plugin, at load) names it
    AS_IS = "as written"  # runs as vLLM wrote it (on CUDA)
    NOT_REACHED = "not reached"  # this target's code path never calls it


L, S, T, R = Handling.LOWERED, Handling.SUBSTITUTED, Handling.TRITON, Handling.REFUSED
# `impl` of an entry point that is the body of the `vllm::` op of the same name: the swap calls that op.
SAME_NAME_OP = "op"


@dataclass(frozen=True)
class Construct:
    name: str  # qualname (op; fnmatch pattern allowed), dotted entry point, or a description (torch, platform)
    kind: str  # "op", "entry point", "Triton kernel", "metadata kernel", "torch", "platform"
    where: str  # where vLLM's NVIDIA path meets it
    cpu: Handling
    xpu: Handling
    cuda: Handling
    becomes: str
    impl: str = ""  # "module:attribute" under dsv4_compile.frontend.ops, or SAME_NAME_OP
    why: str = ""  # for refused ops: why the kernel needs CUDA

    def handling(self, target: str) -> Handling:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; one of {TARGETS}")
        return getattr(self, target)


def _lowered_op(name: str, where: str, becomes: str) -> Construct:
    return Construct(name, "op", where, L, L, L, becomes)


def _wrapper(name: str, where: str, impl: str, becomes: str) -> Construct:
    # on CUDA, cuda_compat changes nothing: the wrapper runs, and the op it calls is lowered
    return Construct(name, "entry point", where, S, S, Handling.AS_IS, becomes, impl)


def _triton(name: str, where: str, impl: str, becomes: str, kind: str = "Triton kernel") -> Construct:
    return Construct(name, kind, where, Handling.STAND_IN, T, T, becomes, impl)


_MHC = "vllm.model_executor.kernels.mhc.tilelang"
_CACHE_UTILS = "vllm.models.deepseek_v4.common.ops.cache_utils"
_MHC_OPS = ("mhc_pre_tilelang", "mhc_post_tilelang", "mhc_fused_post_pre_tilelang", "hc_head_fused_kernel_tilelang",
            "mhc_pre_delayed_tilelang", "mhc_fused_post_pre_delayed_tilelang")
_KV_INSERTS = ("qnorm_rope_kv_rope_quant_insert", "qnorm_rope_kv_rope_full_cache_bf16_insert",
               "qnorm_rope_kv_rope_full_cache_fp8_insert", "kv_rope_insert")

CONSTRUCTS: tuple[Construct, ...] = (
    *(_wrapper(f"{_MHC}.{name}", "nvidia/model.py:21-26", SAME_NAME_OP, f"`vllm::{name}`") for name in _MHC_OPS),
    *(_lowered_op(f"vllm::{name}", "layers/mhc.py", "`mhc` lowering (fp64-checked)") for name in _MHC_OPS),
    _wrapper(f"{_MHC}.mhc_pre_broadcast_tilelang", "nvidia/model.py:730", "vllm_mhc_substitutes:mhc_pre_broadcast",
             "`vllm::mhc_pre_delayed_tilelang` + torch"),
    _lowered_op("_C::silu_and_mul_with_clamp", "MoE experts (SiluAndMulWithClamp)", "`activation` lowering"),
    *(_lowered_op(f"_C::fused_deepseek_v4_{name}", "attention.py:804-838",
                  "`kv_cache` lowering: fp8_ds_mla cache layout") for name in _KV_INSERTS),
    _wrapper("vllm.v1.attention.ops.flashmla.flash_mla_with_kvcache", "nvidia/flashmla.py:248",
             "vllm_attention:flash_mla_with_kvcache", "`_flashmla_C::sparse_decode_fwd`"),
    _wrapper("vllm.v1.attention.ops.flashmla.flash_mla_sparse_fwd", "nvidia/flashmla.py:390",
             "vllm_attention:flash_mla_sparse_fwd", "`_flashmla_C::sparse_prefill_fwd`"),
    _wrapper("vllm.v1.attention.ops.flashmla.get_mla_metadata", "sparse_swa.py:944",
             "vllm_attention:get_mla_metadata", "an empty tile schedule (the decode lowering needs none)"),
    _lowered_op("_flashmla_C::sparse_decode_fwd", "via flash_mla_with_kvcache",
                "`attention` lowering: sparse attention with sink over fp8_ds_mla caches"),
    _lowered_op("_flashmla_C::sparse_prefill_fwd", "via flash_mla_sparse_fwd",
                "`attention` lowering: sparse attention with sink"),
    _lowered_op("_moe_C::topk_softplus_sqrt", "nvidia/model.py:38 (fused_topk_bias)",
                "`routing` lowering: bias or hash routing"),
    Construct("_C::hash_topk_cpu", "op", "FusedMoE on a CPU platform (inside vllm::moe_forward_shared)",
              Handling.AS_IS, Handling.NOT_REACHED, Handling.NOT_REACHED,
              "vLLM's CPU kernel; where its library lacks it, one of the routing lowering's math",
              "vllm_routing:hash_topk_cpu"),
    Construct("_C::biased_topk_cpu", "op", "FusedMoE on a CPU platform (inside vllm::moe_forward_shared)",
              Handling.AS_IS, Handling.NOT_REACHED, Handling.NOT_REACHED,
              "vLLM's CPU kernel; where its library lacks it, one of the routing lowering's math",
              "vllm_routing:biased_topk_cpu"),
    Construct("_C::cpu_fused_moe", "op", "FusedMoE experts on a CPU platform (_custom_ops.py)", Handling.AS_IS,
              Handling.NOT_REACHED, Handling.NOT_REACHED,
              "vLLM's CPU MoE kernel; other platforms call their own fused-MoE ops (not scanned here)"),
    _lowered_op("vllm::fused_inv_rope_fp8_quant_kernel", "nvidia/flashmla.py:62", "`o_proj` lowering"),
    _wrapper("vllm.utils.deep_gemm.fp8_einsum", "nvidia/ops/o_proj.py:89", "vllm_o_proj:fp8_einsum",
             "`dsv4_compat::fp8_einsum` -> `o_proj` lowering"),
    _wrapper("vllm.utils.deep_gemm.tf32_hc_prenorm_gemm", "inside the tilelang mHC ops",
             "vllm_o_proj:tf32_hc_prenorm_gemm", "`dsv4_compat::tf32_hc_prenorm_gemm` -> `o_proj` lowering (fp32)"),
    _wrapper("vllm.v1.worker.workspace.current_workspace_manager", "nvidia/flashmla.py:125, :315",
             "vllm_workspace:current_workspace_manager", "plain allocations of the shapes asked for"),
    _triton("vllm.models.common.ops.fused_qk_rmsnorm.fused_q_kv_rmsnorm", "attention.py",
            "vllm_triton_attention:fused_q_kv_rmsnorm", "q/kv RMSNorm"),
    _triton(f"{_CACHE_UTILS}.dequantize_and_gather_k_cache", "nvidia/flashmla.py",
            "vllm_triton_attention:dequantize_and_gather_k_cache", "fp8_ds_mla cache gather"),
    _triton(f"{_CACHE_UTILS}.combine_topk_swa_indices", "nvidia/flashmla.py",
            "vllm_triton_attention:combine_topk_swa_indices", "index combine"),
    _triton("vllm.models.deepseek_v4.attention.triton", "attention.py:1104, sparse_mla.py:255",
            "vllm_triton_compressor:TRITON_HOST_HELPERS", "host helpers (`next_power_of_2`, `cdiv`)", "module"),
    _triton("vllm.models.deepseek_v4.compressor._SAVE_PARTIAL_STATES_KERNEL", "compressor.py",
            "vllm_triton_compressor:save_partial_states", "compressor partial-state save"),
    _triton("vllm.models.deepseek_v4.compressor.compress_norm_rope_store_triton", "compressor.py:387",
            "vllm_triton_compressor:compress_norm_rope_store", "compress, norm, rope, store"),
    _triton("vllm.models.deepseek_v4.compressor.compress_norm_rope_store_two_stage_triton", "compressor.py",
            "vllm_triton_compressor:compress_norm_rope_store", "compress, norm, rope, store (two stages)"),
    _triton("vllm.models.deepseek_v4.attention.fused_indexer_q_rope_quant", "attention.py",
            "vllm_triton_compressor:fused_indexer_q_rope_quant", "indexer q rope + quant"),
    _triton("vllm.models.deepseek_v4.attention._fill_short_context_topk_indices", "attention.py",
            "vllm_triton_compressor:FILL_SHORT_CONTEXT_TOPK_INDICES", "short-context top-k indices"),
    _triton("vllm.models.deepseek_v4.nvidia.flashmla.compute_global_topk_indices_and_lens", "nvidia/flashmla.py",
            "vllm_triton_compressor:compute_global_topk_indices_and_lens", "global top-k indices and lengths"),
    _triton("vllm.v1.attention.ops.metadata._token_request_mapping_kernel", "metadata.py:43",
            "vllm_metadata_kernels:_token_request_mapping", "token -> request map", "metadata kernel"),
    _triton("vllm.v1.attention.backends.mla.sparse_swa.ComputePrefillMetadataKernel.kernel", "sparse_swa.py",
            "vllm_metadata_kernels:_prefill_gather_lens", "prefill gather lengths", "metadata kernel"),
    _triton("vllm.v1.attention.backends.mla.sparse_swa.ComputeSWAIndicesAndLensKernel.kernel", "sparse_swa.py",
            "vllm_metadata_kernels:_swa_indices_and_lens", "window indices and lengths", "metadata kernel"),
    _triton("vllm.v1.attention.backends.mla.compressor_utils.CompressedSlotMappingKernel.kernel",
            "compressor_utils.py", "vllm_metadata_kernels:_compressed_slot_mapping", "compressed slot mapping",
            "metadata kernel"),
    _triton("vllm.v1.attention.backends.mla.indexer.BuildPrefillChunkMetadataKernel.kernel", "indexer.py",
            "vllm_metadata_kernels:_prefill_chunk_metadata", "prefill chunk metadata", "metadata kernel"),
    _triton("vllm.models.deepseek_v4.sparse_mla.BuildC128ATopkMetadataKernel.kernel", "sparse_mla.py",
            "vllm_metadata_kernels:build_c128a_topk_metadata", "ratio-128 top-k metadata", "metadata kernel"),
    Construct("vllm::*_triton", "op", "vLLM's Triton ops", R, T, T, "the user's Triton kernel",
              why="a vLLM Triton kernel, and the target has no Triton"),
    Construct("vllm::*_tilelang", "op", "any tilelang op without a lowering", R, R, Handling.AS_IS,
              "strict audit error naming the op and the line", why="a vLLM tilelang kernel (tilelang targets CUDA "
              "and ROCm only)"),
    Construct("vllm::*_aiter", "op", "AMD paths (ROCm is torch's `cuda` too)", R, R, Handling.AS_IS,
              "strict audit error",
              why="a vLLM AITER kernel (ROCm only)"),
    Construct("vllm::*_cutedsl", "op", "nvidia/ops/*_cutedsl.py (is_cuda() only)", R, R, Handling.AS_IS,
              "strict audit error", why="a vLLM CuTe-DSL kernel (CUDA only)"),
    Construct("torch.cuda.Stream / Event / current_stream, maybe_execute_in_parallel", "torch",
              "nvidia/model.py:845, attention.py:334, :1064", Handling.REMOVED, Handling.REMOVED, Handling.AS_IS,
              "serial stand-ins while tracing; `aux_streams` removes every stream node"),
    Construct("streams::*", "op", "utils/multi_stream_utils.py (record_event, wait_event)", Handling.REMOVED,
              Handling.REMOVED, Handling.AS_IS, "`aux_streams` removes them (serial execution needs none)"),
    Construct("torch.cuda.is_current_stream_capturing()", "torch", "attention.py:1123", Handling.ANSWERED,
              Handling.ANSWERED, Handling.AS_IS, "False"),
    Construct("torch.mm(..., out_dtype=torch.float32)", "torch", "attention.py:694-716", S, Handling.AS_IS,
              Handling.AS_IS, "`mm(a.float(), b.float())` where the target has no kernel"),
    Construct("device='cuda', .cuda(), .to('cuda')", "torch", "throughout", S, S, Handling.AS_IS,
              "the target device (`device_constants` for what the graph still holds)"),
    Construct("launch_pdl / USE_GDC on a Triton launch", "Triton kernel",
              "common/ops/fused_inv_rope_fp8_quant.py:68, compressor.py:387", Handling.NOT_REACHED, T, T,
              "`pdl` pass: False, or dropped"),
    Construct("current_platform.get_device_capability()", "platform", "nvidia/ops/o_proj.py:28, nvidia/model.py:546",
              Handling.ANSWERED, Handling.ANSWERED, Handling.AS_IS, "9.0: the FlashMLA path the lowerings cover"),
    Construct("DeepGEMM MegaMoE, MXFP4 / FP8 experts, quantized linears, MTP", "platform",
              "nvidia/model.py:33, :86; the checkpoint's quantization", R, R, Handling.AS_IS,
              "refused at load by the plugin, naming the feature"),
)


def cuda_only_op_patterns(target: str) -> dict[str, str]:
    """Op qualname patterns refused on `target` although they may report a kernel for it -> why."""
    return {c.name: c.why for c in CONSTRUCTS if c.kind == "op" and c.why and c.handling(target) is R}


def entry_point_substitutes(target: str) -> dict[str, str]:
    """Dotted entry point -> its implementation ("module:attribute" or SAME_NAME_OP) swapped in on `target`
    while tracing (metadata kernels excluded: vLLM's registry takes those)."""
    swapped = (S, Handling.STAND_IN)
    return {c.name: c.impl for c in CONSTRUCTS
            if c.impl and c.kind not in ("metadata kernel", "op") and c.handling(target) in swapped}


def metadata_kernel_standins() -> dict[str, str]:
    """vLLM kernel-registry name -> the plain-torch kernel registered for it where vLLM has no Triton."""
    return {c.name: c.impl for c in CONSTRUCTS if c.kind == "metadata kernel"}


def resolve(impl: str) -> Any:
    """The object an `impl` string names ("module:attribute" under dsv4_compile.frontend.ops)."""
    module, _, attribute = impl.partition(":")
    return getattr(importlib.import_module(f"dsv4_compile.frontend.ops.{module}"), attribute)


def find(name: str) -> Construct | None:
    """The row for `name` (an exact name, or an op qualname a pattern row matches); None if unknown."""
    exact = next((c for c in CONSTRUCTS if c.name == name), None)
    if exact is not None:
        return exact
    return next((c for c in CONSTRUCTS if c.kind == "op" and fnmatch.fnmatchcase(name, c.name)), None)


def markdown_table() -> str:
    """The README's table, one row per construct."""
    lines = ["| Construct | Kind | Where (vLLM 0.33.0) | cpu | xpu | cuda | Becomes |", "|---|---|---|---|---|---|---|"]
    for c in CONSTRUCTS:
        cells = [f"`{c.name}`", c.kind, c.where, *(c.handling(t).value for t in TARGETS), c.becomes]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
