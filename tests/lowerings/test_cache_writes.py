"""Paged KV-cache writes: the bytes land where the layout says, and under Inductor a write costs the rows
written, not the cache: no buffer the size of the cache is allocated (a write through a view of a graph input
would be compiled as a copy of the whole input, on every decode step).

Oracle: the layout written out in the test, one slot at a time in Python (block `s // block_size`, offset
`s % block_size`, token-major regions within a block), on a cache that is a strided view of a larger buffer, as
vLLM's caches are."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from dsv4_compile.frontend.ops.vllm_triton_compressor import _write_indexer_rows, save_partial_states
from dsv4_compile.lowering.lowerings.fp8_ds_mla import pack_fp8_ds_mla, write_fp8_ds_mla_slots
from dsv4_compile.lowering.lowerings.kv_cache import write_row_cache

BLOCKS, BLOCK_SIZE = 40, 16


def padded_cache(row_bytes: int, dtype: torch.dtype = torch.uint8, pad: int = 24) -> torch.Tensor:
    """`[BLOCKS, BLOCK_SIZE, row_bytes]` over blocks `pad` elements longer than the cache needs."""
    backing = torch.randint(0, 255, (BLOCKS, BLOCK_SIZE * row_bytes + pad), dtype=torch.uint8).to(dtype)
    return backing[:, :BLOCK_SIZE * row_bytes].view(BLOCKS, BLOCK_SIZE, row_bytes)


def expected_token_major(cache: torch.Tensor, rows: torch.Tensor, slots: list[int], widths: list[int]) -> torch.Tensor:
    out = cache.clone()
    for row, slot in zip(rows, slots, strict=False):
        if slot < 0:
            continue
        flat = out[slot // BLOCK_SIZE].view(-1)
        start, first = 0, 0
        for width in widths:
            offset = first + (slot % BLOCK_SIZE) * width
            flat[offset:offset + width] = row[start:start + width]
            start, first = start + width, first + BLOCK_SIZE * width
    return out


SLOT_CASES = [[3, -1, 200, 17], [-1, -1], [BLOCKS * BLOCK_SIZE - 1]]


@pytest.mark.parametrize("slots", SLOT_CASES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_fp8_ds_mla_rows_land_at_their_slots(slots: list[int], compiled: bool) -> None:
    torch.manual_seed(0)
    cache, latent = padded_cache(584), torch.randn(len(slots) + 2, 512)  # rows past the slot mapping: not written
    expected = expected_token_major(cache, pack_fp8_ds_mla(latent), slots, [576, 8])
    write = torch.compile(write_fp8_ds_mla_slots, backend="inductor", fullgraph=True) if compiled \
        else write_fp8_ds_mla_slots
    write(cache, latent, torch.tensor(slots), BLOCK_SIZE)
    assert torch.equal(cache, expected)


def test_row_cache_rows_land_at_their_slots() -> None:
    cache, rows, slots = padded_cache(512, torch.bfloat16), torch.randn(3, 512).bfloat16(), [9, -1, 600]
    expected = expected_token_major(cache, rows, slots, [512])
    write_row_cache(cache, rows, torch.tensor(slots), BLOCK_SIZE)
    assert torch.equal(cache, expected)


def test_partial_states_land_in_both_halves_of_their_rows() -> None:
    head, width, ratio = 8, 16, 4
    cache = padded_cache(2 * width, torch.float32)
    kv, score, ape = torch.randn(3, head), torch.randn(3, head), torch.randn(ratio, head)
    positions, slots = torch.tensor([5, 6, 7]), [33, -1, 2]
    expected = cache.clone()
    for t, slot in enumerate(slots):
        if slot >= 0:
            row = expected[slot // BLOCK_SIZE, slot % BLOCK_SIZE]
            row[:head], row[width:width + head] = kv[t], score[t] + ape[positions[t] % ratio]
    save_partial_states(kv, score, ape, positions, cache, torch.tensor(slots), BLOCK_SIZE, width, ratio)
    assert torch.equal(cache, expected)


def _largest_allocation(code: str) -> int:
    sizes = []
    for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code):
        dims = [int(d) for d in shape.split(",") if d.strip().isdigit()]
        sizes.append(int(torch.tensor(dims).prod()) if dims else 1)
    return max(sizes, default=0)


# writer -> (cache, the rows' inputs, the write)
WRITERS: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], tuple[torch.Tensor, ...]], Callable[..., None]]] = {
    "fp8_ds_mla": (lambda: padded_cache(584), lambda: (torch.randn(4, 512),),
                   lambda cache, slots, latent: write_fp8_ds_mla_slots(cache, latent, slots, BLOCK_SIZE)),
    "bf16 rows": (lambda: padded_cache(512, torch.bfloat16), lambda: (torch.randn(4, 512).bfloat16(),),
                  lambda cache, slots, rows: write_row_cache(cache, rows, slots, BLOCK_SIZE)),
    "indexer": (lambda: padded_cache(132), lambda: (torch.randn(4, 128),),
                lambda cache, slots, rows: _write_indexer_rows(cache, rows, slots)),
    "compressor state": (lambda: padded_cache(32, torch.float32),
                         lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)),
                         lambda cache, slots, kv, score, ape: save_partial_states(
                             kv, score, ape, torch.arange(4), cache, slots, BLOCK_SIZE, 16, 4)),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_compiled_write_allocates_rows_not_the_cache(writer: str) -> None:
    make_cache, make_inputs, write = WRITERS[writer]
    torch.manual_seed(1)
    cache, inputs, slots = make_cache(), make_inputs(), torch.tensor([7, -1, 300, 45])

    def write_then_read(cache: torch.Tensor, slots: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        write(cache, slots, *inputs)
        return cache[slots.clamp_min(0) // BLOCK_SIZE].float().sum()

    eager_cache = cache.clone()
    expected = write_then_read(eager_cache, slots, *inputs)
    result, codes = run_and_get_code(torch.compile(write_then_read, backend="inductor"), cache, slots, *inputs)
    assert torch.equal(cache, eager_cache) and torch.allclose(result, expected, rtol=1e-6)  # a sum: any order
    largest = max(_largest_allocation(code) for code in codes)
    assert largest < cache.numel() // 8, f"{writer}: a buffer of {largest} elements for a cache of {cache.numel()}"


def test_quant_insert_on_a_reshaped_padded_cache_writes_the_cache_in_place() -> None:
    """vLLM calls the insert on `cache.view(cache.shape[0], -1)` of a cache whose blocks are padded: the backend
    hands the lowering the cache itself (`paged=`), which Inductor writes in place; the bytes are the eager
    lowering's on the reshaped view."""
    from dsv4_compile.frontend.ops.vllm import define_missing_ops
    from dsv4_compile.lowering.lowerings.kv_cache import qnorm_rope_kv_rope_quant_insert_native

    define_missing_ops()
    torch.manual_seed(2)
    cache = padded_cache(584)
    q, kv = torch.randn(3, 2, 512).bfloat16(), torch.randn(3, 512).bfloat16()
    slots, positions = torch.tensor([4, -1, 300]), torch.tensor([1, 2, 3])
    angles = torch.arange(8.0)[:, None] * torch.rand(32)
    table = torch.cat([angles.cos(), angles.sin()], -1)

    def insert(cache: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        blocks = cache.view(cache.shape[0], -1)
        out = torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert(q, kv, blocks, slots, positions, table,
                                                                            4, 1e-6, BLOCK_SIZE)
        return out.float().sum() + blocks[slots.clamp_min(0) // BLOCK_SIZE].float().sum()

    expected_cache = cache.clone()
    qnorm_rope_kv_rope_quant_insert_native(q, kv, expected_cache.view(BLOCKS, -1), slots, positions, table, 4, 1e-6,
                                           BLOCK_SIZE)
    _, codes = run_and_get_code(torch.compile(insert, backend="dsv4_xpu"), cache, q, kv)
    assert torch.equal(cache, expected_cache)
    largest = max(_largest_allocation(code) for code in codes)
    assert largest < cache.numel() // 8, f"a buffer of {largest} elements for a cache of {cache.numel()}"


def test_paged_names_a_mutated_cache() -> None:
    from dsv4_compile.lowering.registry import native_lowering

    with pytest.raises(ValueError, match=r"paged= names mutated caches; \['other'\]"):
        native_lowering("dsv4_paged_test::write", mutates=("cache",), paged=("other",))(lambda cache, other: None)
