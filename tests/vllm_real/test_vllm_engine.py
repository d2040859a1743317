"""vLLM's engine (`vllm.LLM`) serving DeepSeek-V4 on CPU: its NVIDIA model through the plugin and dsv4_xpu, and
vLLM's CPU port as the oracle, each in a process of its own, from one safetensors checkpoint loaded by vLLM's
real loader (dsv4_compile.tools.vllm_checkpoint).

Prompts of 7 tokens (below the 128-token window and every compression boundary), 33 (eight ratio-4 entries) and
130 (past the window and the first ratio-128 entry), with different token budgets so that requests finish at
different steps; max_num_seqs=2, so the third request's prefill joins the others' decode steps. (vLLM's CPU
platform turns chunked prefill off for MLA models, cpu.py:521, so a prompt is never split.)

The `engine` tier: `make test-engine` (its own process; each engine compiles the whole model, minutes here).
"""

from __future__ import annotations

import math

import pytest

from tests.vllm_real.cpu_kernels import needs_vllm_cpu_kernels

pytestmark = pytest.mark.engine

PROMPTS = [[(5 * i + 3) % 256 for i in range(7)], [(11 * i + 1) % 256 for i in range(33)],
           [(7 * i) % 256 for i in range(130)]]
MAX_TOKENS = [8, 5, 3]
# Greedy picks may differ only where the oracle's two best logprobs are this close (bf16 activations, the FP8
# KV cache's rounding and a different summation order per path); picked tokens' logprobs agree within LOGPROB_ATOL.
TIE_TOLERANCE = 0.05
LOGPROB_ATOL = 0.15


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dsv4_compile.tools.vllm_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-dsv4"), seed=0)


@pytest.fixture(scope="module")
def nvidia(checkpoint):
    from dsv4_compile.tools.vllm_engine import run_engine

    return run_engine("nvidia", checkpoint, PROMPTS, MAX_TOKENS, phases=("batched", "alone", "batched", "batched"),
                      max_num_seqs=2)


def test_the_engine_serves_the_nvidia_model_compiled_by_dsv4_xpu(nvidia):
    assert nvidia["model_class"] == "DeepseekV4ForCausalLMNvidiaPath"
    first = nvidia["runs"][0]
    assert first["dynamo"]["unique_graphs"] > 0, "nothing was compiled"
    rewrites = nvidia["rewrites"]
    assert rewrites["lower_ops"]["changed"] > 0 and rewrites["audit"]["graphs"] == rewrites["lower_ops"]["graphs"]
    for result, budget in zip(first["results"], MAX_TOKENS, strict=True):
        assert len(result["tokens"]) == budget
        assert all(0 <= token < 256 for token in result["tokens"])
        picked = [step[str(token)] for token, step in zip(result["tokens"], result["logprobs"], strict=True)]
        assert all(math.isfinite(lp) and lp <= 0 for lp in picked)
        # greedy: the picked token is the best of the returned alternatives
        assert all(lp >= max(step.values()) - 1e-6 for lp, step in zip(picked, result["logprobs"], strict=True))


def test_batched_and_alone_give_the_same_tokens(nvidia):
    batched, alone, *_ = nvidia["runs"]
    for together, single in zip(batched["results"], alone["results"], strict=True):
        assert together["tokens"] == single["tokens"]


def test_steady_state_compiles_nothing(nvidia):
    """Once batched and alone runs have seen every shape (and Dynamo has made the sizes that vary dynamic), the
    same batch again compiles no graph: no recompile per decode step, the recompile limit never approached."""
    last = nvidia["runs"][-1]
    assert last["dynamo"] == {"unique_graphs": 0, "graph_breaks": 0, "recompiles": 0, "frames_ok": 0}
    assert [r["tokens"] for r in last["results"]] == [r["tokens"] for r in nvidia["runs"][0]["results"]]


def agree_except_at_ties(ours: dict, oracle: dict) -> None:
    for step, (token, reference) in enumerate(zip(ours["tokens"], oracle["tokens"], strict=True)):
        options = oracle["logprobs"][step]
        if token != reference:
            best = sorted(options.values(), reverse=True)
            assert best[0] - best[1] <= TIE_TOLERANCE, (
                f"step {step}: picked {token}, the CPU port {reference} (its top logprobs {options})")
            return  # past a tie the sequences continue from different tokens
        assert abs(ours["logprobs"][step][str(token)] - options[str(reference)]) <= LOGPROB_ATOL


@needs_vllm_cpu_kernels
@pytest.mark.xfail(strict=True, reason="open: measured on an AVX-512 BF16 CPU, the prefill step's logprobs agree "
                   "with the CPU port within 0.08, decode steps drift up to 0.26 (7-token prompt, step 5: 0.19 on the "
                   "picked token) and the 130-token prompt's step 1 picks 175 where the CPU port's top two are 0.078 "
                   "apart; README, Known limits")
def test_same_tokens_as_vllms_cpu_port(checkpoint, nvidia):
    from dsv4_compile.tools.vllm_engine import run_engine

    cpu_port = run_engine("cpu-port", checkpoint, PROMPTS, MAX_TOKENS, phases=("batched", "alone"), max_num_seqs=2)
    assert cpu_port["model_class"] == "DeepseekV4ForCausalLM"
    for ours, oracle in zip(nvidia["runs"][0]["results"], cpu_port["runs"][0]["results"], strict=True):
        agree_except_at_ties(ours, oracle)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from dsv4_compile.tools.vllm_server import serve

    with serve("nvidia", checkpoint, tmp_path_factory.mktemp("server") / "server.log", max_num_seqs=2) as running:
        yield running
    assert running.process.returncode == 0, f"the server did not stop cleanly:\n{running.log.read_text()[-4000:]}"


def test_the_server_answers_several_requests_at_once_with_the_engines_tokens(server, nvidia):
    """vLLM's OpenAI server with the plugin: the three prompts sent at once, from three client threads, as
    /v1/completions requests with token-id prompts; then again one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(server.complete, PROMPTS, MAX_TOKENS))
    single = [server.complete(prompt, budget) for prompt, budget in zip(PROMPTS, MAX_TOKENS, strict=True)]
    engine_batched, engine_alone, *_ = nvidia["runs"]
    assert [r["tokens"] for r in single] == [r["tokens"] for r in engine_alone["results"]]
    for served, engine in zip(single, engine_alone["results"], strict=True):
        for ours, theirs in zip(served["logprobs"], engine["logprobs"], strict=True):
            assert ours.keys() == theirs.keys()
            assert all(abs(ours[token] - theirs[token]) <= 1e-4 for token in ours)
    for served, engine in zip(together, engine_batched["results"], strict=True):
        agree_except_at_ties(served, engine)


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"prompt": list(range(256)) * 3}, 400, "maximum context length is 512 tokens"),  # 768 prompt tokens
    ({"max_tokens": -1}, 400, "max_tokens must be at least 1"),
    ({"model": "another-model"}, 404, "does not exist"),
    ({"logprobs": 50}, 400, "greater than max allowed: 20"),
])
def test_bad_requests_get_vllms_errors_and_the_server_keeps_serving(server, nvidia, change, status, message):
    """(Not among them: a token id past the vocabulary. With skip_tokenizer_init vLLM checks prompt ids against
    no vocabulary (renderers/base.py:420-428, "skipped when the tokenizer is not initialized"), so such an id
    reaches the embedding and stops the engine, on any model and path; named in the README's engine section.)"""
    refused = server.complete(**{"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS[0], **change})
    assert refused.get("status") == status, refused
    assert message in refused["error"]["message"], refused
    assert server.complete(PROMPTS[0], MAX_TOKENS[0])["tokens"] == nvidia["runs"][1]["results"][0]["tokens"]
