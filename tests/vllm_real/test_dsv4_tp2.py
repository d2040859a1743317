"""vLLM's NVIDIA DeepSeek-V4 window layer at tensor parallelism 2 through dsv4_xpu, against tensor parallelism 1.

Two CPU processes (tests/vllm_real/dsv4_tp_worker.py) form a gloo world with vLLM's own
initialize_model_parallel and each build layer 0 of the harness's tiny config (window attention, hash-routed MoE)
with TP=2 shards of the same full weights, loaded through vLLM's weight loaders. The reference is the same layer
at TP=1, built and run in this process through the same backend on the same tokens. Both run a prefill and two
single-token decodes. The ranks' rewritten graphs must keep vLLM's collectives as they were and the audit must
not flag them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dsv4_compile.tools import vllm_layers as harness
from tests.vllm_real import dsv4_tp_worker as worker
from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

# Every test here compares with vLLM's CPU port.
pytestmark = needs_vllm_cpu_kernels

WORLD_SIZE = 2
REPO = Path(__file__).resolve().parents[2]
RANK_TIMEOUT_S = 300


def _spawn_ranks(workdir: Path) -> list[subprocess.Popen]:
    from tests.vllm_real.dsv4_dist import free_tcp_port

    port = free_tcp_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "tests.vllm_real.dsv4_tp_worker", str(rank), str(WORLD_SIZE),
                              str(port), str(workdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for rank in range(WORLD_SIZE)]


def _wait(ranks: list[subprocess.Popen]) -> None:
    failures = []
    for rank, process in enumerate(ranks):
        try:
            log, _ = process.communicate(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            log, _ = process.communicate()
        if process.returncode != 0:
            failures.append(f"rank {rank} exited with {process.returncode}:\n{log[-4000:]}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture(scope="module")
def runs():
    """(TP=1 output and records, [per rank: output, records, how each parameter was loaded])."""
    from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp())
    harness.write_tiny_config(workdir / "model", **worker.ONE_LAYER)
    vllm_config = worker.make_config(workdir / "model", 1)
    harness.init_single_process_distributed(vllm_config)
    register_metadata_kernels()
    layers = harness.build_nvidia_layers(vllm_config)
    torch.save(harness.fill_weights(layers[0], seed=0), workdir / "weights.pt")
    ranks = _spawn_ranks(workdir)  # they run while this process computes the reference
    try:
        harness.process_weights(vllm_config, layers)
        reference = worker.run_window_layer(vllm_config, layers)
    finally:
        _wait(ranks)
    return reference, [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_each_rank_loaded_its_shard_of_the_full_weights(runs):
    _, ranks = runs
    for rank, result in enumerate(ranks):
        loaded = result["loaded"]
        assert loaded["attn.attn_sink"] == f"heads {32 * rank}:{32 * (rank + 1)}"
        assert loaded["attn.wq_b.weight"] == "weight_loader (32768, 128) -> (16384, 128)"  # column-parallel heads
        assert loaded["attn.wo_b.weight"] == "weight_loader (256, 1024) -> (256, 512)"  # row-parallel
        assert loaded["ffn.shared_experts.down_proj.weight"] == "weight_loader (256, 64) -> (256, 32)"
        assert loaded["attn.fused_wqa_wkv.weight"] == "weight_loader"  # replicated (disable_tp)


def test_ranks_agree_bitwise(runs):
    # After the all-reduces every rank holds the same sums, and the rest of the layer is replicated work.
    _, ranks = runs
    assert torch.equal(ranks[0]["output"], ranks[1]["output"])


# Measured (prefill of 13, then 2 decodes; 15 tokens): per token 0.31-0.97% relative error, max |diff| 0.078 at
# |x| <= 6. The kv projection is replicated, so both runs write the same FP8 cache rows; the differences come from
# the row-parallel wo_b and the tensor-parallel experts: each rank's partial sum over half of K is rounded to
# bf16 and the two are added in bf16 by the all-reduce, where TP=1 rounds one full-K sum once; the hc mixing
# after the layer carries that (a bf16 ulp is 0.4% relative) into every stream. Bounds: 2x the worst token, and 4
# bf16 ulps at |x| in [4, 8) per element.
TOKEN_RELATIVE_BOUND, ATOL = 2e-2, 0.125


def test_tp2_window_layer_gives_the_tp1_numbers(runs):
    (expected, _), ranks = runs
    actual, expected = ranks[0]["output"].float(), expected.float()
    assert actual.shape == expected.shape == (sum(worker.STEPS), 4, 256)
    error = (actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert error.max() < TOKEN_RELATIVE_BOUND, error.tolist()
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def test_collectives_reach_inductor_unmodified_and_unflagged(runs):
    (_, reference_records), ranks = runs
    # World size 1 bypasses every collective (GroupCoordinator.all_reduce returns its input).
    assert not any(record["before"] for record in reference_records)
    for result in ranks:
        records = result["records"]
        assert all(record["audit"] == 0 for record in records)
        with_collectives = [record for record in records if record["before"]]
        for record in with_collectives:
            assert record["after"] == record["before"]
        reduces = [call for record in with_collectives for call in record["before"]
                   if "all_reduce" in call or "allreduce" in call]
        # Per step one after the row-parallel wo_b and one after the MoE; decode reuses the first decode's graph.
        assert len(reduces) == 4, reduces
        lowered = {family: sum(record["lowered"][family] for record in records) for family in worker.LOWERED_FAMILIES}
        assert all(count >= 2 for count in lowered.values()), lowered
