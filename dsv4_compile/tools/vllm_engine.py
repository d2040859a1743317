"""vLLM's engine on a DeepSeek-V4 checkpoint, one path per process: vLLM's CPU port or its NVIDIA model through
dsv4_xpu (the vLLM plugin), greedy generation of token-id prompts, with timings and Dynamo's counters.

Each path runs in a process of its own, as a user's `vllm.LLM(...)` would: vLLM loads its plugins and picks the
model class once per process. `run_engine(...)` starts `python -m dsv4_compile.tools.vllm_engine` and returns
what it printed as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATHS = ("cpu-port", "nvidia")
# What the plugin's switches are for each path (see integrations/vllm_plugin.py).
PATH_ENV = {"cpu-port": {"DSV4_COMPILE_CPU_PORT": "1"}, "nvidia": {"DSV4_COMPILE_NVIDIA_PATH": "1"}}


def engine_env(path: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DSV4_COMPILE_NVIDIA_PATH", "DSV4_COMPILE_CPU_PORT", "VLLM_PLUGINS")}
    env.update(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", **PATH_ENV[path])
    return env


def run_engine(path: str, model: str | Path, prompts: list[list[int]], max_tokens: list[int] | int = 8,
               phases: tuple[str, ...] = ("batched",), logprobs: int = 5, kv_cache_bytes: int = 64 << 20,
               max_num_seqs: int = 4, extra: dict[str, Any] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Generate greedily for `prompts` on `path` in a fresh process, once per phase ("batched": all prompts in
    one `generate`, "alone": one `generate` per prompt), in one engine; see `serve_request` for the result."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; one of {PATHS}")
    if not set(phases) <= {"batched", "alone"}:
        raise ValueError(f"phases are 'batched' or 'alone', got {phases}")
    request = {"path": path, "model": str(model), "prompts": prompts, "max_tokens": max_tokens,
               "phases": list(phases), "logprobs": logprobs, "kv_cache_bytes": kv_cache_bytes,
               "max_num_seqs": max_num_seqs, "extra": extra or {}}
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request), capture_output=True,
                          text=True, env=engine_env(path), timeout=timeout)
    marker = "DSV4_ENGINE_RESULT "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {path} engine failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len(marker):])


# vLLM's engine arguments for a small model (token-id prompts, bf16, 512-token context), shared by the offline
# engine here and the server (tools/vllm_server.py, as command-line flags).
ENGINE_ARGS: dict[str, Any] = {"skip_tokenizer_init": True, "dtype": "bfloat16", "max_model_len": 512,
                               "max_num_batched_tokens": 512, "seed": 0}


def make_llm(model: str, kv_cache_bytes: int, max_num_seqs: int = 4, **extra: Any) -> Any:
    """vLLM's offline engine for a small model (ENGINE_ARGS) with a fixed KV-cache size."""
    from vllm import LLM

    return LLM(model=model, max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_cache_bytes, **ENGINE_ARGS, **extra)


def generate(llm: Any, prompts: list[list[int]], max_tokens: list[int], logprobs: int,
             batched: bool) -> tuple[list[dict[str, Any]], float]:
    """Greedy tokens and their top logprobs per prompt (all in one call, or one call per prompt); seconds."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, logprobs=logprobs)
              for n in max_tokens]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    start = time.perf_counter()
    if batched:
        outputs = llm.generate(inputs, params, use_tqdm=False)
    else:
        outputs = [llm.generate([i], [p], use_tqdm=False)[0] for i, p in zip(inputs, params, strict=True)]
    seconds = time.perf_counter() - start
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tops = [{str(token): float(lp.logprob) for token, lp in step.items()} for step in completion.logprobs]
        results.append({"tokens": list(completion.token_ids), "logprobs": tops})
    return results, seconds


def dynamo_counts() -> dict[str, int]:
    """Dynamo's totals so far in this process; a recompile is a frame compiled again with a recompile reason
    (Dynamo's compilation metrics, kept whole by `keep_compilation_metrics`)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": sum(1 for metrics in get_compilation_metrics() if metrics.recompile_reason),
            "frames_ok": int(counters["frames"]["ok"])}


def keep_compilation_metrics() -> None:
    """Dynamo keeps the metrics of its last 64 compilations only; an engine compiles more."""
    from torch._dynamo.utils import set_compilation_metrics_limit

    set_compilation_metrics_limit(1 << 20)


def serve_request(request: dict[str, Any]) -> dict[str, Any]:
    """Build the engine, run each phase; per phase the results, seconds, tokens and Dynamo's counter deltas."""
    keep_compilation_metrics()
    start = time.perf_counter()
    llm = make_llm(request["model"], request["kv_cache_bytes"], request["max_num_seqs"], **request["extra"])
    load_seconds = time.perf_counter() - start
    prompts = request["prompts"]
    max_tokens = request["max_tokens"]
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    runs = []
    for phase in request["phases"]:
        before = dynamo_counts()
        results, seconds = generate(llm, prompts, max_tokens, request["logprobs"], phase == "batched")
        after = dynamo_counts()
        runs.append({"phase": phase, "results": results, "seconds": seconds,
                     "tokens": sum(len(r["tokens"]) for r in results),
                     "dynamo": {key: after[key] - before[key] for key in after}})
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    return {"path": request["path"], "load_seconds": load_seconds, "runs": runs, "dynamo_total": dynamo_counts(),
            "model_class": type(model).__name__, "rewrites": rewrite_totals()}


def rewrite_totals() -> dict[str, dict[str, int]]:
    """What dsv4_xpu's passes matched and changed over every graph compiled in this process, per pass."""
    import dsv4_compile

    totals: dict[str, dict[str, int]] = {}
    for report in dsv4_compile.all_reports():
        for stats in report.passes:
            entry = totals.setdefault(stats.name, {"graphs": 0, "matched": 0, "changed": 0})
            entry["graphs"] += 1
            entry["matched"] += stats.matched
            entry["changed"] += stats.changed
    return totals


def main() -> None:
    request = json.loads(sys.stdin.read())
    result = serve_request(request)
    print("DSV4_ENGINE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
