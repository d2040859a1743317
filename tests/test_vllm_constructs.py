"""The table of vLLM's CUDA-only constructs (dsv4_compile.vllm_constructs) and what is derived from it: the
README's table, the audit's refusals, cuda_compat's swaps and the lowerings it names. No vLLM needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dsv4_compile.frontend.kernel_wrappers import vllm_substitutes
from dsv4_compile.lowering.passes.audit import known_cuda_only
from dsv4_compile.lowering.registry import LOWERINGS
from dsv4_compile.vllm_constructs import (
    CONSTRUCTS,
    SAME_NAME_OP,
    TARGETS,
    Handling,
    find,
    markdown_table,
    resolve,
)

README = Path(__file__).resolve().parents[1] / "README.md"
REPLICA_NAMESPACES = ("dsv4_cuda::", "dsv4_compat::")  # the replica's ops, and the project's DeepGEMM stand-ins


def test_readme_table_is_the_code_table(capsys):
    from dsv4_compile.tools.cli import main

    assert main(["constructs"]) == 0
    assert capsys.readouterr().out.strip() == markdown_table()
    text = README.read_text()
    found = re.search(r"<!-- vllm-constructs:begin -->\n(.*?)\n<!-- vllm-constructs:end -->", text, re.S)
    assert found, "README has no vllm-constructs table"
    assert found.group(1).strip() == markdown_table(), "README table differs: paste `dsv4-compile constructs`"


def test_every_lowered_op_has_its_lowering_and_every_vllm_lowering_a_row():
    lowered = {c.name for c in CONSTRUCTS if c.kind == "op" and Handling.LOWERED in map(c.handling, TARGETS)}
    assert lowered <= set(LOWERINGS), sorted(lowered - set(LOWERINGS))
    # the package's own lowerings (other test modules register some for ops of their own in this process)
    vllm_lowerings = {name for name, lowering in LOWERINGS.items() if not name.startswith(REPLICA_NAMESPACES)
                      and lowering.native.__module__.startswith("dsv4_compile.lowering.lowerings.")}
    assert vllm_lowerings == lowered


def test_every_implementation_named_resolves():
    for construct in CONSTRUCTS:
        if construct.impl and construct.impl != SAME_NAME_OP:
            assert callable(resolve(construct.impl)) or construct.kind == "module", construct.name
        swapped = {Handling.SUBSTITUTED, Handling.STAND_IN} & set(map(construct.handling, TARGETS))
        if swapped and construct.kind in ("entry point", "Triton kernel", "metadata kernel", "module"):
            assert construct.impl, f"{construct.name} is swapped for nothing"


def test_swaps_per_target_follow_the_table():
    without_triton, with_triton = vllm_substitutes(torch.device("cpu")), vllm_substitutes(torch.device("xpu"))
    stand_ins = {c.name for c in CONSTRUCTS if c.cpu is Handling.STAND_IN and c.kind != "metadata kernel"}
    kept_triton = {c.name for c in CONSTRUCTS if c.xpu is Handling.TRITON and c.impl}
    assert stand_ins and stand_ins <= set(without_triton)
    assert not kept_triton & set(with_triton), "a Triton kernel is replaced on a Triton target"
    assert without_triton["vllm.v1.attention.ops.flashmla.flash_mla_with_kvcache"] is resolve(
        "vllm_attention:flash_mla_with_kvcache")
    op_call = with_triton["vllm.model_executor.kernels.mhc.tilelang.mhc_pre_tilelang"]
    assert op_call.__name__ == "mhc_pre_tilelang_as_op"


@pytest.mark.parametrize(("qualname", "device", "refused"), [
    ("vllm::mhc_pre_aiter", "cpu", True), ("vllm::mhc_pre_aiter", "xpu", True), ("vllm::mhc_pre_aiter", "cuda", False),
    ("vllm::some_new_tilelang", "xpu", True), ("vllm::some_new_tilelang", "cuda", False),
    ("vllm::indexer_triton", "cpu", True), ("vllm::indexer_triton", "xpu", False),
    ("vllm::gate_cutedsl", "cpu", True), ("_C::rms_norm", "cpu", False),
])
def test_audit_refusals_come_from_the_table(qualname, device, refused):
    assert (known_cuda_only(qualname, torch.device(device)) is not None) is refused


def test_find_matches_names_and_patterns():
    assert find("vllm::mhc_pre_tilelang").handling("xpu") is Handling.LOWERED  # exact row before the pattern
    assert find("vllm::other_tilelang").name == "vllm::*_tilelang"
    assert find("vllm.unknown.function") is None
    with pytest.raises(ValueError, match="unknown target"):
        find("vllm::mhc_pre_tilelang").handling("mps")

