"""vLLM's own DeepSeek-V4 decoder layers on this CPU, one layer kind at a time: the NVIDIA path compiled by dsv4_xpu
(with Inductor) under cuda_compat("cpu") against vLLM's hand-written CPU port run eagerly, with the same weights,
inputs, KV-cache layout and forward contexts (dsv4_compile.tools.vllm_layers / vllm_steps), side by side in one run.

    python -m benchmarks.bench_vllm_layers [--kinds window-hash,ratio4] [--batches 1,8] [--decode-steps 8]
                                           [--prefill 64] [--prefill-reps 3] [--wide] [--threads N]

Per layer kind (vllm_coverage.LAYER_KINDS) and batch size: a prefill of --prefill tokens per request (median of
--prefill-reps after a first call, which compiles) and steady-state decode (median ms per step of --decode-steps
one-token steps per request at successive positions, after two warm-up steps); min_ms: the fastest timed call (less
disturbed by other work on a shared machine). Only the layer's forward is timed: vLLM's metadata builders run outside
the timed region. compile_s: the first call. graphs: graphs dsv4_xpu compiled in that phase; breaks: Dynamo's
graph-break count then; graphs_per_step: compiled graphs one timed step runs.
ratio: dsv4_xpu ms / cpu-port ms. max_rel_diff: the largest per-token relative difference of the two paths' outputs
(the last prefill, the last decode step). --wide adds every row again at hidden_size 1024.
Writes benchmarks/results/vllm_layers.json (+ .png with matplotlib). CPU numbers of this machine, not GPU or XPU
measurements. vLLM's CPU port runs only where vLLM has its DeepSeek-V4 CPU kernels (its AVX-512 BF16 library);
elsewhere it is skipped, ratio is None, and the reason is printed and recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import traceback

import torch

from benchmarks.common import plot, print_table, write_results

CONFIGS = {"tiny": {}, "wide": {"hidden_size": 1024}}
DECODE_WARMUP = 2
COLUMNS = ["config", "path", "kind", "phase", "batch", "tokens", "ms", "min_ms", "ratio", "max_rel_diff", "compile_s",
           "graphs", "breaks", "graphs_per_step", "error"]


def cpu_port_missing() -> str | None:
    """Why vLLM's CPU port cannot run here (the vllm_real tier's probe for its DeepSeek-V4 kernels), or None.
    Checked before anything of the port is built: without those kernels its library can die with SIGILL."""
    try:
        from tests.vllm_real.cpu_kernels import REASON, vllm_cpu_kernels_loaded
    except ImportError:  # no tests folder: the demo's check of the CPU's features
        from dsv4_compile.tools.vllm_demo import _cpu_port_unavailable

        return _cpu_port_unavailable()
    return None if vllm_cpu_kernels_loaded() else REASON


def build_stack(path: str, overrides: dict, max_num_seqs: int, max_tokens: int, weights: list | None) -> tuple:
    """`path`'s decoder layers for the tiny config with `overrides`, as harness.tiny_stack builds them, but with room
    for `max_num_seqs` requests a step; weights filled as tiny_stack fills them, or copied from `weights`."""
    from dsv4_compile.frontend.ops.vllm_metadata_kernels import register_metadata_kernels
    from dsv4_compile.integrations.vllm_engine import mark_kv_caches_static
    from dsv4_compile.tools import vllm_layers as harness
    from dsv4_compile.tools import vllm_steps as steps

    config = harness.make_vllm_config(harness.write_tiny_config(tempfile.mkdtemp(), **overrides))
    # The harness fixes 4 (vllm_layers.MAX_NUM_SEQS); vLLM's SWA metadata builder and compressor size per-request
    # buffers by it when they are built, so a batch of 8 needs it raised before anything is built.
    config.scheduler_config.max_num_seqs = max(max_num_seqs, harness.MAX_NUM_SEQS)
    harness.init_single_process_distributed(config)
    layers = (harness.build_cpu_port_layers if path == "cpu-port" else harness.build_nvidia_layers)(config)
    if weights is None:
        weights = [harness.fill_weights(layer, seed=100 * index) for index, layer in enumerate(layers)]
    else:
        for values, layer in zip(weights, layers, strict=True):
            if missing := harness.copy_weights(values, layer):
                raise RuntimeError(f"{path}: parameters without a value: {missing}")
    harness.process_weights(config, layers)
    register_metadata_kernels()
    setup = steps.allocate_kv_caches(config, max_tokens=max_tokens, num_sequences=max_num_seqs)
    if path == "dsv4_xpu":
        mark_kv_caches_static(torch.nn.ModuleList(layers))  # as the engine integration does
    return config, layers, setup, weights


def bench_kind(path: str, stack: tuple, index: int, args: argparse.Namespace, outputs: dict, key: tuple) -> list:
    """Prefill and decode rows of layer `index` of `stack` for each batch size; a failure ends that batch's rows with
    one carrying the error."""
    from torch._dynamo.utils import counters

    import dsv4_compile
    from dsv4_compile.tools import vllm_layers as harness
    from dsv4_compile.tools import vllm_steps as steps

    config, layers, setup, _ = stack
    hf = config.model_config.hf_config
    only = lambda name: name.startswith(harness.layer_prefix(index) + ".")  # noqa: E731
    counter = steps.GraphCounter()
    forward = lambda x, p, i: harness.run_layers([layers[index]], x, p, i)  # noqa: E731
    if path == "dsv4_xpu":
        torch._dynamo.reset()
        forward = torch.compile(forward, backend=counter)
    compat = (lambda: dsv4_compile.cuda_compat("cpu")) if path == "dsv4_xpu" else contextlib.nullcontext

    def step(sequences: list, count: int) -> tuple[float, torch.Tensor]:
        ids = torch.cat([(7 * torch.arange(s.num_computed, s.num_computed + count) + 13 * r) % 256
                         for r, s in enumerate(sequences)])
        stream = harness.residual_stream(ids, hf.hidden_size, hf.hc_mult)
        with compat(), steps.batch_step(config, setup, [(s, count) for s in sequences], only) as positions:
            start = time.perf_counter()
            out = forward(stream, positions, ids)
            return time.perf_counter() - start, out

    rows = []
    for batch in args.batches:
        phase = "prefill"
        sequences = [steps.new_sequence(setup, r) for r in range(batch)]
        try:
            for phase, count, warmup, reps in (("prefill", args.prefill, 1, args.prefill_reps),
                                               ("decode", 1, DECODE_WARMUP, args.decode_steps)):
                breaks, compiled = sum(counters["graph_break"].values()), counter.compiled
                times = []
                for rep in range(warmup + reps):
                    if phase == "prefill":
                        for sequence in sequences:
                            sequence.num_computed = 0
                    if rep == warmup:
                        calls = counter.calls
                    seconds, out = step(sequences, count)
                    times.append(seconds)
                row = {"config": key[0], "path": path, "kind": key[1], "phase": phase, "batch": batch,
                       "tokens": batch * count, "ms": 1e3 * statistics.median(times[warmup:]),
                       "min_ms": 1e3 * min(times[warmup:]), "compile_s": times[0],
                       "ms_all": [1e3 * t for t in times]}
                if path == "dsv4_xpu":
                    row |= {"graphs": counter.compiled - compiled,
                            "breaks": sum(counters["graph_break"].values()) - breaks,
                            "graphs_per_step": (counter.calls - calls) / reps}
                outputs[(*key, phase, batch, path)] = out.float()
                rows.append(row)
        except Exception as exc:
            message = "".join(traceback.format_exception_only(exc)).strip()
            print(f"  {path} {key[1]} batch {batch} {phase} failed: {message[:300]}", flush=True)
            rows.append({"config": key[0], "path": path, "kind": key[1], "phase": phase, "batch": batch,
                         "error": message[-2000:], "traceback": traceback.format_exc()[-4000:]})
    return rows


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest per-token relative (L2) difference: tokens x hc streams x hidden."""
    return float(((actual - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)).max())


def main() -> None:
    from dsv4_compile.tools.vllm_coverage import LAYER_KINDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(LAYER_KINDS), help=f"comma-separated, of {list(LAYER_KINDS)}")
    parser.add_argument("--batches", default="1,8", help="requests per step, comma-separated")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps (after 2 warm-up steps)")
    parser.add_argument("--prefill", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--prefill-reps", type=int, default=3, help="timed prefills (after 1 that compiles)")
    parser.add_argument("--wide", action="store_true", help="also at hidden_size 1024")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 steadies a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds, args.batches = args.kinds.split(","), [int(b) for b in args.batches.split(",")]
    if unknown := sorted(set(kinds) - set(LAYER_KINDS)):
        parser.error(f"unknown kind(s) {unknown}; of {list(LAYER_KINDS)}")
    if min(args.decode_steps, args.prefill_reps, args.prefill, *args.batches) < 1:
        parser.error("--decode-steps, --prefill-reps, --prefill and --batches must be at least 1")
    started, load_before = time.time(), os.getloadavg()
    missing = cpu_port_missing()
    if missing:
        print(f"cpu-port skipped: {missing}", flush=True)
    paths = ["dsv4_xpu"] if missing else ["cpu-port", "dsv4_xpu"]
    max_tokens = args.prefill + DECODE_WARMUP + args.decode_steps
    rows: list[dict] = []
    outputs: dict[tuple, torch.Tensor] = {}
    config_names = ["tiny", "wide"] if args.wide else ["tiny"]
    for config_name in config_names:
        groups: dict[str, list[str]] = {}  # kinds built from the same config overrides share one stack
        for kind in kinds:
            groups.setdefault(repr(sorted(LAYER_KINDS[kind][0].items())), []).append(kind)
        for group in groups.values():
            overrides = {**LAYER_KINDS[group[0]][0], **CONFIGS[config_name]}
            weights = None
            for path in paths:
                print(f"[{time.time() - started:.0f}s] {config_name} {path}: building {', '.join(group)}", flush=True)
                try:
                    stack = build_stack(path, overrides, max(args.batches), max_tokens, weights)
                except Exception as exc:
                    error = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
                    print(f"  {path} stack failed: {error[:300]}", flush=True)
                    rows += [{"config": config_name, "path": path, "kind": k, "error": error} for k in group]
                    continue
                weights = stack[3]
                for kind in group:
                    print(f"[{time.time() - started:.0f}s] {config_name} {path} {kind}", flush=True)
                    rows += bench_kind(path, stack, LAYER_KINDS[kind][1], args, outputs, (config_name, kind))
    for row in rows:
        if row["path"] != "dsv4_xpu" or "ms" not in row:
            continue
        where = (row["config"], row["kind"], row["phase"], row["batch"])
        reference = next((r for r in rows if r["path"] == "cpu-port" and "ms" in r
                          and (r["config"], r["kind"], r["phase"], r["batch"]) == where), None)
        row["ratio"] = row["ms"] / reference["ms"] if reference else None
        if reference:
            row["max_rel_diff"] = relative_difference(outputs[(*where, "dsv4_xpu")], outputs[(*where, "cpu-port")])
    print_table([{**r, "error": (r.get("error") or "")[:60]} for r in rows], COLUMNS)
    seconds = time.time() - started
    print(f"wall {seconds:.0f}s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"torch threads {torch.get_num_threads()}")
    plot("vllm_layers", [{"batch": b, **{f"{r['kind']} {r['path']}": r["ms"] for r in rows
                                         if r.get("batch") == b and r.get("phase") == "decode" and "ms" in r
                                         and r["config"] == "tiny"}} for b in args.batches],
         "batch", [f"{k} {p}" for k in kinds for p in paths], ylabel="ms per decode step (tiny config)")
    write_results("vllm_layers", rows, {
        "cpu_port_missing": missing, "wall_s": seconds, "load_average_before_after": [load_before, os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "configs": {c: CONFIGS[c] for c in config_names},
        "prefill_tokens": args.prefill, "prefill_reps": args.prefill_reps, "decode_warmup": DECODE_WARMUP,
        "decode_steps": args.decode_steps, "cpu": {"avx512": torch.cpu._is_avx512_supported(),
                                                   "avx512_bf16": torch.cpu._is_avx512_bf16_supported()},
        "note_cpu": "CPU numbers (this machine), not GPU or XPU measurements"})


if __name__ == "__main__":
    main()
