"""o_proj family: the attention output projection of vLLM's NVIDIA DeepSeek-V4 path.

- `vllm::fused_inv_rope_fp8_quant_kernel`: inverse GPT-J RoPE on the last `2 * half_rope` dims of each head of
  `o [T, H, D]`, then, with `quantize`, FP8 e4m3 per `quant_group_size` block with power-of-two scales. Returns
  `out [G, T, heads_per_group * D]` and scales `[G, T, scale_inner]` laid out MN-major over a token dim padded
  to `tma_aligned_T` (zeros in the padding): fp32 per block, or with `tma_aligned_scales` int32 words of four
  UE8M0 exponent bytes (block 4j + i in byte i of word j).
- `dsv4_compat::fp8_einsum`: DeepGEMM's `fp8_einsum(equation, (a, a_scale), (b, b_scale), out, c, recipe)`:
  both operands dequantised (a scale entry covers a block of its operand: `recipe = (gran_m, gran_n, gran_k)`
  entries along a's free dim, b's free dim and the contracted last dim, 1 along a batch dim; fp32 scales, or int32
  words of four UE8M0 bytes along the last dim), einsum in fp32, plus `c` when given, written to `out` in its
  dtype. vLLM's o_proj passes `bhr,hdr->bhd` with (1, 128, 128) and fp32 scales (SM90) or (1, 1, 128) and packed
  UE8M0 (SM100).
- `dsv4_compat::tf32_hc_prenorm_gemm`: `out[s] = x[:, K_s] @ fn[:, K_s]^T`, `sqrsum[s] = sum of x[:, K_s]^2` over
  `num_split` contiguous chunks K_s of the K dim (their sum is the whole product; None: one, unbatched outs).
"""

from __future__ import annotations

import torch

from dsv4_compile.lowering.registry import native_lowering

UE8M0_BIAS = 127
ABSMAX_FLOOR = 1e-10


# ----------------------------------------------------------------------------- inverse RoPE + FP8 quantisation
def inverse_gptj_rope(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, nope_dim: int,
                      half_rope: int) -> torch.Tensor:
    """`o [T, H, D]` with its rope dims (pairs (2i, 2i+1) from `nope_dim`) rotated by -position; fp32."""
    x = o.float()
    cache = cos_sin_cache.index_select(0, positions.reshape(-1).long()).float().unsqueeze(1)
    cos, sin = cache[..., :half_rope], cache[..., half_rope:2 * half_rope]
    pairs = x[..., nope_dim:nope_dim + 2 * half_rope].unflatten(-1, (half_rope, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos + odd * sin, odd * cos - even * sin), dim=-1).flatten(-2)
    return torch.cat((x[..., :nope_dim], rotated), dim=-1)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales `[..., 4n]` as int32 words `[..., n]` of their exponent bytes, little end first."""
    exponents = (scales.contiguous().view(torch.int32).long() >> 23) & 0xFF
    shifts = torch.arange(4, device=scales.device, dtype=torch.int64) * 8
    words = (exponents.unflatten(-1, (exponents.shape[-1] // 4, 4)) << shifts).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # two's complement into int32


def unpack_ue8m0(words: torch.Tensor) -> torch.Tensor:
    """int32 words `[..., n]` of four UE8M0 bytes as fp32 scales `[..., 4n]` (2 ** (byte - 127))."""
    shifts = torch.arange(4, device=words.device, dtype=torch.int64) * 8
    exponents = (words.long().unsqueeze(-1) >> shifts) & 0xFF
    return torch.exp2((exponents - UE8M0_BIAS).float()).flatten(-2)


def check_fused_inv_rope_fp8_quant(
    o: torch.Tensor, cos_sin_cache: torch.Tensor, heads_per_group: int, quant_group_size: int,
    chunks_per_head: int, nope_dim: int, half_rope: int, tma_aligned_scales: bool, tma_aligned_T: int,
    num_tokens: int, n_groups: int, d: int, scale_inner: int, quantize: bool, **_: object,
) -> None:
    """The kernel's contract on its operands; raises ValueError with what is wrong."""
    head_dim = chunks_per_head * quant_group_size
    if tuple(o.shape) != (num_tokens, n_groups * heads_per_group, head_dim):
        raise ValueError(f"o has shape {tuple(o.shape)}, expected {(num_tokens, n_groups * heads_per_group, head_dim)}")
    if nope_dim + 2 * half_rope != head_dim or d != heads_per_group * head_dim:
        raise ValueError(f"nope_dim {nope_dim} + rope 2 * {half_rope} must be the head dim {head_dim}, and d {d} "
                         f"heads_per_group * head_dim")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.shape[-1] != 2 * half_rope:
        raise ValueError(f"cos_sin_cache must be fp32 [max_pos, {2 * half_rope}], got {cos_sin_cache.dtype} "
                         f"{tuple(cos_sin_cache.shape)}")
    if quantize:
        blocks = heads_per_group * chunks_per_head
        expected = (blocks + 3) // 4 if tma_aligned_scales else blocks
        if tma_aligned_scales and chunks_per_head % 4:
            raise ValueError(f"packed UE8M0 scales need chunks_per_head % 4 == 0, got {chunks_per_head}")
        if scale_inner != expected or tma_aligned_T < num_tokens:
            raise ValueError(f"scale_inner {scale_inner} (expected {expected}) or tma_aligned_T {tma_aligned_T} "
                             f"(< {num_tokens} tokens) is wrong")


@native_lowering("vllm::fused_inv_rope_fp8_quant_kernel", check=check_fused_inv_rope_fp8_quant)
def fused_inv_rope_fp8_quant_native(
    o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, heads_per_group: int,
    quant_group_size: int, chunks_per_head: int, nope_dim: int, half_rope: int, tma_aligned_scales: bool,
    fp8_max: float, tma_aligned_T: int, num_tokens: int, n_groups: int, d: int, scale_inner: int, quantize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out [G, T, d], scales [G, T, scale_inner])`, see the module docstring."""
    grouped = inverse_gptj_rope(o, positions, cos_sin_cache, nope_dim, half_rope).reshape(num_tokens, n_groups, d)
    scale_dtype = torch.int32 if tma_aligned_scales else torch.float32
    if not quantize:
        return grouped.to(o.dtype).transpose(0, 1).contiguous(), torch.empty(0, dtype=scale_dtype, device=o.device)
    blocks = grouped.unflatten(-1, (-1, quant_group_size))
    absmax = blocks.abs().amax(-1).clamp_min(ABSMAX_FLOOR)
    scales = torch.exp2(torch.ceil(torch.log2(absmax * (1.0 / fp8_max))))
    quantized = torch.clamp(blocks / scales.unsqueeze(-1), -fp8_max, fp8_max).to(torch.float8_e4m3fn)
    out = quantized.flatten(-2).transpose(0, 1).contiguous()
    stored = pack_ue8m0(scales) if tma_aligned_scales else scales
    # MN-major: [G, scale_inner, tma_aligned_T] in memory, the token padding zeroed; viewed as [G, T, scale_inner].
    padded = torch.nn.functional.pad(stored.permute(1, 2, 0), (0, tma_aligned_T - num_tokens))
    return out, padded[..., :num_tokens].transpose(1, 2)


# ----------------------------------------------------------------------------- DeepGEMM entry points
def einsum_granularity(equation: str, recipe: list[int] | None, packed: tuple[bool, bool]) -> list[list[int]]:
    """Per operand, the block each scale entry covers along each dim: a free (M or N) dim of a or b blocks of
    recipe[0] or recipe[1], the contracted last dim recipe[2], a batch dim 1. Without a recipe, DeepGEMM's
    (1, 128, 128) for fp32 scales, (1, 1, 128) for packed UE8M0."""
    inputs, _, result = equation.replace(" ", "").partition("->")
    operands = inputs.split(",")
    blocks = []
    for which, (mine, other) in enumerate((operands, operands[::-1])):
        grans = recipe if recipe is not None else ((1, 1, 128) if packed[which] else (1, 128, 128))
        blocks.append([grans[2] if i == len(mine) - 1 else grans[which] if (c in result and c not in other) else 1
                       for i, c in enumerate(mine)])
    return blocks


def scale_entries(data: torch.Tensor, scale: torch.Tensor, blocks: list[int]) -> list[int]:
    """The scale shape `data` needs: a block per entry, the last dim packed four to a word when int32."""
    entries = [-(-size // block) for size, block in zip(data.shape, blocks)]
    if scale.dtype == torch.int32:
        entries[-1] = -(-entries[-1] // 4)
    return entries


def dequantize(data: torch.Tensor, scale: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """`data` times its block scales, fp32: int32 `scale` holds packed UE8M0, fp32 the scales themselves."""
    factors = unpack_ue8m0(scale) if scale.dtype == torch.int32 else scale.float()
    for dim, (size, block) in enumerate(zip(data.shape, blocks)):
        if block != 1 or factors.shape[dim] != size:
            factors = factors.index_select(dim, torch.arange(size, device=data.device) // block)
    return data.float() * factors


def check_fp8_einsum(
    equation: str, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out: torch.Tensor, c: torch.Tensor | None = None, recipe: list[int] | None = None, **_: object,
) -> None:
    """What the native math assumes; raises ValueError with what is wrong."""
    inputs, _, result = equation.replace(" ", "").partition("->")
    operands = inputs.split(",")
    if len(operands) != 2 or any(len(o) != t.dim() for o, t in zip(operands, (a, b))) or len(result) != out.dim():
        raise ValueError(f"equation {equation!r} does not fit a {a.dim()}-d a, {b.dim()}-d b, {out.dim()}-d out")
    if operands[0][-1] != operands[1][-1] or operands[0][-1] in result:
        raise ValueError(f"equation {equation!r}: both operands must contract over their last dim")
    if recipe is not None and len(recipe) != 3:
        raise ValueError(f"recipe must be (gran_m, gran_n, gran_k), got {recipe}")
    for name, scale in (("a", a_scale), ("b", b_scale)):
        if scale.dtype not in (torch.float32, torch.int32):
            raise ValueError(f"{name}_scale must be fp32 or packed UE8M0 int32, got {scale.dtype}")
    packed = (a_scale.dtype == torch.int32, b_scale.dtype == torch.int32)
    for name, data, scale, blocks in zip(("a", "b"), (a, b), (a_scale, b_scale),
                                         einsum_granularity(equation, recipe, packed)):
        expected = scale_entries(data, scale, blocks)
        if list(scale.shape) != expected:
            raise ValueError(f"{name}_scale has shape {tuple(scale.shape)}, expected {tuple(expected)} for "
                             f"{name} {tuple(data.shape)} in blocks of {tuple(blocks)}")
    if c is not None and tuple(c.shape) != tuple(out.shape):
        raise ValueError(f"c has shape {tuple(c.shape)}, out {tuple(out.shape)}")


@native_lowering("dsv4_compat::fp8_einsum", check=check_fp8_einsum, mutates=("out",))
def fp8_einsum_native(
    equation: str, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
    out: torch.Tensor, c: torch.Tensor | None = None, recipe: list[int] | None = None,
) -> None:
    """`out = einsum(equation, dequant(a), dequant(b)) (+ c)`, fp32 math, rounded once to out's dtype."""
    a_blocks, b_blocks = einsum_granularity(equation, recipe, (a_scale.dtype == torch.int32,
                                                               b_scale.dtype == torch.int32))
    result = torch.einsum(equation, dequantize(a, a_scale, a_blocks), dequantize(b, b_scale, b_blocks))
    if c is not None:
        result = result + c.float()
    out.copy_(result.to(out.dtype))


def check_tf32_hc_prenorm_gemm(
    x: torch.Tensor, fn: torch.Tensor, out: torch.Tensor, sqrsum: torch.Tensor, num_split: int | None, **_: object,
) -> None:
    """DeepGEMM's contract on the operands; raises ValueError with what is wrong."""
    if x.dim() != 2 or fn.dim() != 2 or x.shape[1] != fn.shape[1]:
        raise ValueError(f"x [M, K] and fn [N, K] expected, got {tuple(x.shape)} and {tuple(fn.shape)}")
    m, n = x.shape[0], fn.shape[0]
    splits = () if num_split is None else (num_split,)
    if tuple(out.shape) != (*splits, m, n) or tuple(sqrsum.shape) != (*splits, m):
        raise ValueError(f"out {tuple(out.shape)} / sqrsum {tuple(sqrsum.shape)} must be {(*splits, m, n)} / "
                         f"{(*splits, m)}")
    if out.dtype != torch.float32 or sqrsum.dtype != torch.float32 or fn.dtype != torch.float32:
        raise ValueError("fn, out and sqrsum must be fp32")


@native_lowering("dsv4_compat::tf32_hc_prenorm_gemm", check=check_tf32_hc_prenorm_gemm, mutates=("out", "sqrsum"))
def tf32_hc_prenorm_gemm_native(
    x: torch.Tensor, fn: torch.Tensor, out: torch.Tensor, sqrsum: torch.Tensor, num_split: int | None,
) -> None:
    """Split-K partial products and sums of squares (see the module docstring), in fp32."""
    splits = 1 if num_split is None else num_split
    m, k = x.shape
    chunk = -(-k // splits)
    pad = (0, chunk * splits - k)
    xs = torch.nn.functional.pad(x.float(), pad).view(m, splits, chunk)
    fns = torch.nn.functional.pad(fn.float(), pad).view(fn.shape[0], splits, chunk)
    out.copy_(torch.einsum("msk,nsk->smn", xs, fns).reshape(out.shape))
    sqrsum.copy_(xs.square().sum(-1).transpose(0, 1).reshape(sqrsum.shape))
