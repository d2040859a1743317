"""The "fp8_ds_mla" KV-cache layout of DeepSeek-V4 (the paged uint8 cache vLLM's CUDA and CPU kernels write
and read), as plain-torch encode/decode. Not an op lowering: the kv-cache insert and the sparse attention
lowerings share it.

One latent row is 512 values: `nope` (the first 448) and `rope` (the last 64).

Per token, 584 bytes:
  - 448 bytes: nope as FP8 e4m3fn (OCP, max 448), in 7 quantisation blocks of 64 values;
  - 128 bytes: rope as 64 little-endian bf16 values, not quantised;
  - 8 bytes: one UE8M0 scale byte per nope block (7), then one zero padding byte.
A scale byte `e` means the scale 2**(e - 127). Encoding a block: `amax = max(max|x|, 1e-4)`,
`scale = 2**ceil(log2(amax / 448))` (fp32 arithmetic), byte `clamp(log2(scale) + 127, 0, 255)`, values
`e4m3(clamp(x / scale, -448, 448))` rounded to nearest even. Decoding: `float(e4m3) * 2**(e - 127)`.

Paged cache: `[num_blocks, block_bytes]` uint8 (or `[num_blocks, block_size, 584]`, the same bytes), slot
`s` lives in block `s // block_size` at offset `o = s % block_size`. Within a block the 576 data bytes of all
tokens come first and the scales after them:
  - data of token o:   bytes [o * 576, (o + 1) * 576)
  - scales of token o: bytes [block_size * 576 + o * 8, block_size * 576 + (o + 1) * 8)
  - bytes from block_size * 584 to block_bytes: padding, never written.
"""

from __future__ import annotations

import torch

LATENT_DIM = 512
NOPE_DIM = 448
ROPE_DIM = 64
QUANT_BLOCK = 64
NOPE_BLOCKS = NOPE_DIM // QUANT_BLOCK  # 7
SCALE_BYTES = 8  # 7 scales + 1 padding byte
NOPE_BYTES = NOPE_DIM  # one e4m3 byte per value
ROPE_BYTES = ROPE_DIM * 2  # bf16
TOKEN_DATA_BYTES = NOPE_BYTES + ROPE_BYTES  # 576
BYTES_PER_TOKEN = TOKEN_DATA_BYTES + SCALE_BYTES  # 584
E4M3_MAX = 448.0
UE8M0_BIAS = 127
AMAX_FLOOR = 1e-4


def quantize_nope_ue8m0(nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`nope [..., 448]` (any float dtype) -> (e4m3 bytes `[..., 448]` uint8, scale bytes `[..., 7]` uint8)."""
    blocks = nope.float().reshape(*nope.shape[:-1], NOPE_BLOCKS, QUANT_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX))
    scaled = (blocks / torch.exp2(exponent)).clamp(-E4M3_MAX, E4M3_MAX)
    values = scaled.to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)
    scale_bytes = (exponent.squeeze(-1) + UE8M0_BIAS).clamp(0, 255).to(torch.uint8)
    return values, scale_bytes


def dequantize_nope_ue8m0(values: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_nope_ue8m0: (`[..., 448]` uint8, `[..., 7]` uint8) -> `[..., 448]` fp32."""
    decoded = values.view(torch.float8_e4m3fn).float().reshape(*values.shape[:-1], NOPE_BLOCKS, QUANT_BLOCK)
    scale = torch.exp2(scale_bytes.float() - UE8M0_BIAS).unsqueeze(-1)
    return (decoded * scale).flatten(-2)


def pack_fp8_ds_mla(latent: torch.Tensor) -> torch.Tensor:
    """`latent [N, 512]` (bf16/fp32) -> `[N, 584]` uint8: 448 e4m3 bytes, 128 rope bytes (bf16), 8 scale bytes."""
    if latent.shape[-1] != LATENT_DIM:
        raise ValueError(f"fp8_ds_mla packs rows of {LATENT_DIM} values, got shape {tuple(latent.shape)}")
    values, scale_bytes = quantize_nope_ue8m0(latent[..., :NOPE_DIM])
    rope_bytes = latent[..., NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    padding = scale_bytes.new_zeros(*scale_bytes.shape[:-1], SCALE_BYTES - NOPE_BLOCKS)
    return torch.cat([values, rope_bytes, scale_bytes, padding], dim=-1)


def unpack_fp8_ds_mla(packed: torch.Tensor) -> torch.Tensor:
    """`packed [..., 584]` uint8 (pack_fp8_ds_mla's rows) -> `[..., 512]` fp32."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != BYTES_PER_TOKEN:
        raise ValueError(f"fp8_ds_mla rows are {BYTES_PER_TOKEN} uint8 bytes, got {packed.dtype} {tuple(packed.shape)}")
    nope = dequantize_nope_ue8m0(packed[..., :NOPE_BYTES], packed[..., TOKEN_DATA_BYTES:TOKEN_DATA_BYTES + NOPE_BLOCKS])
    rope = packed[..., NOPE_BYTES:TOKEN_DATA_BYTES].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, rope], dim=-1)


def paged_regions(cache: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a paged fp8_ds_mla cache: (token data `[num_blocks, block_size, 576]`, scales
    `[num_blocks, block_size, 8]`); writing them writes the cache."""
    if cache.dtype != torch.uint8:
        raise ValueError(f"an fp8_ds_mla cache is uint8, got {cache.dtype}")
    blocks = cache.view(cache.shape[0], -1)
    if blocks.shape[1] < block_size * BYTES_PER_TOKEN:
        raise ValueError(
            f"an fp8_ds_mla block of {block_size} tokens needs {block_size * BYTES_PER_TOKEN} bytes, "
            f"the cache has {blocks.shape[1]}"
        )
    data_end = block_size * TOKEN_DATA_BYTES
    # view, not unflatten: Tensor.unflatten is Python that Dynamo cannot trace under a TorchFunctionMode
    # (cuda_compat's), and the graph break it causes in a trace-time stand-in loses the strided cache view.
    data = blocks[:, :data_end].view(-1, block_size, TOKEN_DATA_BYTES)
    scales = blocks[:, data_end:data_end + block_size * SCALE_BYTES].view(-1, block_size, SCALE_BYTES)
    return data, scales


def read_fp8_ds_mla_slots(cache: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of a paged fp8_ds_mla cache at `slots [...]` (negative: none, read as zeros) -> `[..., 512]` fp32."""
    data, scales = paged_regions(cache, block_size)
    flat = slots.reshape(-1).long()
    safe = flat.clamp_min(0)
    block, offset = safe // block_size, safe % block_size
    packed = torch.cat([data[block, offset], scales[block, offset]], dim=-1)
    rows = unpack_fp8_ds_mla(packed).masked_fill((flat < 0).unsqueeze(-1), 0.0)
    return rows.view(*slots.shape, LATENT_DIM)


def write_fp8_ds_mla_slots(cache: torch.Tensor, latent: torch.Tensor, slots: torch.Tensor, block_size: int) -> None:
    """Quantise `latent [N, 512]` and write row i at slot `slots[i]` of the paged cache, in place; slot -1
    (any negative) skips the row. Bytes of other slots and the block padding are left as they were. Only the
    first `slots.shape[0]` rows are written (the caller's rows may be padded beyond the slot mapping)."""
    if slots.shape[0] == 0:
        return
    paged_regions(cache, block_size)  # the layout check
    scatter_paged_rows(cache, token_major_regions(block_size, (TOKEN_DATA_BYTES, SCALE_BYTES)),
                       pack_fp8_ds_mla(latent[:slots.shape[0]]), slots, block_size)


# A region of a paged cache, in the columns of one block (the cache's dims after the first, flattened):
# token o's `width` columns start at `first + o * token_stride`.
Region = tuple[int, int, int]  # (first, token_stride, width)


def token_major_regions(block_size: int, widths: tuple[int, ...]) -> list[Region]:
    """Regions of a block that holds, one after another, each region's `width` columns for all its tokens."""
    regions, first = [], 0
    for width in widths:
        regions.append((first, width, width))
        first += block_size * width
    return regions


def scatter_paged_rows(
    cache: torch.Tensor, regions: list[Region], rows: torch.Tensor, slots: torch.Tensor, block_size: int
) -> None:
    """Write `rows [N, W]` at `slots [N]` (negative: skip) into the `regions` of paged `cache [num_blocks, ...]`
    (the region widths summing to W: row columns go to the regions in order), in place.

    One `index_put_` on `cache` itself, not writes through views of it: Inductor turns a write through a view
    of a graph input into a copy of the whole input (the whole KV cache, on every step); an `index_put_` on the
    input it compiles as a store of the N rows."""
    if slots.shape[0] == 0:
        return
    slots = slots.long()
    valid = slots >= 0
    # Skipped rows are redirected, without a data-dependent shape, to a slot that is written anyway with the
    # same bytes (the first valid row's), or, when no row is valid, to slot 0 with the bytes it already holds.
    first_valid = torch.argmax(valid.to(torch.int8), dim=0, keepdim=True)  # [1]: indexes as a tensor, not an int
    any_valid = valid.gather(0, first_valid)
    fallback_slot = torch.where(any_valid, slots.gather(0, first_valid), 0)
    current = cache[_slot_coordinates(cache, regions, fallback_slot, block_size)]
    fallback_row = torch.where(any_valid.unsqueeze(-1), rows.index_select(0, first_valid), current)
    target = torch.where(valid, slots, fallback_slot)
    rows = torch.where(valid.unsqueeze(-1), rows, fallback_row)
    cache.index_put_(_slot_coordinates(cache, regions, target, block_size), rows)


def _slot_coordinates(
    cache: torch.Tensor, regions: list[Region], slots: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, ...]:
    """Index tensors into `cache` (`[N, 1]` for the block, `[N, W]` for each further dim) of the regions' columns
    of each slot in `slots [N]`."""
    block, offset = (slots // block_size).unsqueeze(-1), (slots % block_size).unsqueeze(-1)
    columns = torch.cat([first + offset * token_stride + torch.arange(width, device=slots.device)
                         for first, token_stride, width in regions], dim=-1)
    coordinates = []
    for size in reversed(cache.shape[1:]):
        coordinates.append(columns % size)
        columns = columns // size
    return (block, *reversed(coordinates))
