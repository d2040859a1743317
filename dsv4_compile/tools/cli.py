"""The `dsv4-compile` command: demo, passes, diff, codegen."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

SUBJECT_NOTE = (
    "The subject is the CUDA-oriented DeepSeek-V4 model (CudaDeepseekV4.forward_static over a StaticCache): "
    "'tiny' is DeepseekV4Config.tiny() (every layer kind); 'flash' keeps Flash's real widths but is shrunk to "
    "2 layers (compress ratios 4 and 128), 4 routed experts and a 1024-token vocabulary so that it builds on "
    "a laptop; 'flash_layer' is one Flash-shaped layer (compress ratio 4, 8 routed experts, 6 per token) with "
    "a 1024-token vocabulary. Mode 'prefill' feeds 16 tokens of one sequence, 'decode' one token for each of 2 "
    "sequences."
)


@dataclasses.dataclass(frozen=True)
class Subject:
    """What the diff and codegen commands capture: a CUDA-oriented model and its example inputs."""

    title: str
    model: Callable[..., Any]
    inputs: tuple[Any, ...]


def _config(name: str) -> Any:
    from dsv4_compile.models.deepseek_v4.config import DeepseekV4Config

    if name == "tiny":
        return DeepseekV4Config.tiny()
    if name == "flash_layer":
        return DeepseekV4Config.flash().with_(num_hidden_layers=1, compress_ratios=[4], n_routed_experts=8,
                                              num_experts_per_tok=6, num_hash_layers=0, vocab_size=1024)
    return DeepseekV4Config.flash().with_(num_hidden_layers=2, compress_ratios=[4, 128], n_routed_experts=4,
                                          num_experts_per_tok=2, vocab_size=1024, num_hash_layers=0)


def _subject(config: str, mode: str) -> Subject:
    """The model (built under cuda_compat, as CUDA-oriented code must be without CUDA) and inputs to show."""
    from dsv4_compile.frontend.cuda_compat import cuda_compat
    from dsv4_compile.models.deepseek_v4 import DeepseekV4Model
    from dsv4_compile.models.deepseek_v4.cuda_model import CudaDeepseekV4
    from dsv4_compile.models.deepseek_v4.static_cache import StaticCache, decode_inputs, prefill_inputs

    model = DeepseekV4Model(_config(config), dtype=torch.bfloat16)
    with cuda_compat("cuda" if torch.cuda.is_available() else "cpu"):
        cuda_model = CudaDeepseekV4(model)
    cache = StaticCache(model, max_seq_len=64, num_slots=2)
    if mode == "prefill":
        ids = torch.randint(0, model.config.vocab_size, (16,))
        return Subject(f"DeepSeek-V4[{config}, prefill]", cuda_model.prefill_static,
                       (ids, *prefill_inputs(cache, 0, 16), cache))
    ids = torch.randint(0, model.config.vocab_size, (2,))
    return Subject(f"DeepSeek-V4[{config}, decode]", cuda_model.decode_static,
                   (ids, *decode_inputs(cache, torch.tensor([0, 1])), cache))


def _console(record: bool = False) -> Any:
    from rich.console import Console

    return Console(record=True, width=160) if record else Console()


def _cmd_demo(args: argparse.Namespace) -> int:
    from dsv4_compile.tools.demo import run_demo

    return run_demo(args.device)


def _cmd_vllm_demo(args: argparse.Namespace) -> int:
    from dsv4_compile.tools.vllm_demo import run_vllm_demo

    return run_vllm_demo(args.max_tokens, args.model_dir)


def _cmd_passes(args: argparse.Namespace) -> int:
    from dsv4_compile.lowering.pipeline import PASSES
    from dsv4_compile.tools.render import passes_table

    _console().print(passes_table(PASSES))
    return 0


def _cmd_constructs(args: argparse.Namespace) -> int:
    from dsv4_compile.vllm_constructs import markdown_table

    print(markdown_table())
    return 0


def _cmd_coverage(args: argparse.Namespace) -> int:
    from dsv4_compile.tools.vllm_coverage import report_lines, scan

    coverage = scan(args.kinds) if args.kinds else scan()
    print("\n".join(report_lines(coverage)))
    return 0 if coverage.ok else 1


def _cmd_diff(args: argparse.Namespace) -> int:
    from dsv4_compile.frontend.capture import capture, rewrite
    from dsv4_compile.tools.diff import DiffRecorder
    from dsv4_compile.tools.render import pass_diff, report_table

    console = _console(record=args.html is not None)
    subject = _subject(args.config, args.mode)
    gm = capture(subject.model, *subject.inputs)
    recorder = DiffRecorder(subject.title, args.device)
    _, report = rewrite(gm, args.device, strict=False, observer=recorder, name=subject.title)
    console.print(report_table(report))
    diffs = [d for d in recorder.diffs if args.pass_name in (None, d.name)]
    if args.pass_name and not diffs:
        console.print(f"pass [cyan]{args.pass_name}[/cyan] changed nothing in {subject.title}")
    for diff in diffs:
        console.print(pass_diff(diff))
    if report["audit"].matched:
        console.print(f"[red]the audit found {report['audit'].matched} CUDA-only node(s) left[/red]")
    if args.html is not None:
        console.save_html(args.html)
        console.print(f"wrote {args.html}")
    return 0


def _cmd_codegen(args: argparse.Namespace) -> int:
    from dsv4_compile.errors import OptionsError
    from dsv4_compile.tools.codegen import codegen
    from dsv4_compile.tools.render import codegen_summary, report_table

    compile_kernels = args.compile or bool(args.arch)
    if compile_kernels and args.device != "xpu":
        raise OptionsError("--compile and --arch compile XPU kernels with Intel's Triton: use --device xpu")
    console = _console()
    subject = _subject(args.config, args.mode)
    result = codegen(subject.model, subject.inputs, device=args.device)
    files = result.write(args.out)
    console.print(report_table(result.report))
    console.print(codegen_summary(result))
    console.print(f"wrote {len(files)} files to {args.out} (wrapper.py, kernels/, graph.py, aten_graph.py, report.txt)")
    return _compile_xpu(result, args, console) if compile_kernels else 0


def _compile_xpu(result: Any, args: argparse.Namespace, console: Any) -> int:
    """Compile the generated kernels with Intel's Triton; the table, then each failure with its message."""
    from rich.text import Text

    from dsv4_compile.tools.render import xpu_compile_table
    from dsv4_compile.tools.xpu_compile import XpuCompileError, compile_xpu_kernels

    report = compile_xpu_kernels(result, archs=args.arch, python=args.xpu_python, jobs=args.jobs,
                                 device_asserts=not args.no_device_asserts, check=False)
    console.print(xpu_compile_table(report))
    if report.ok:
        return 0
    console.print(Text.assemble(("error: ", "bold red"), str(XpuCompileError(report))))
    return 1


def _subject_parser(sub: argparse._SubParsersAction, name: str, *, help: str,  # noqa: A002 - argparse's name
                    description: str) -> argparse.ArgumentParser:
    """A subcommand that captures the CUDA-oriented subject: --config and --mode."""
    parser = sub.add_parser(name, help=help, description=f"{description} {SUBJECT_NOTE}")
    parser.add_argument("--config", choices=("tiny", "flash", "flash_layer"), default="tiny",
                        help="model config (default: tiny)")
    parser.add_argument("--mode", choices=("prefill", "decode"), default="prefill", help="default: prefill")
    return parser


def _parser() -> argparse.ArgumentParser:
    from dsv4_compile.lowering.pipeline import pass_names

    parser = argparse.ArgumentParser(prog="dsv4-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile the tiny CUDA-oriented DeepSeek-V4 on the local device; check parity")
    demo.add_argument("--device", default=None, help="target device (default: cuda/xpu if present, else cpu)")
    demo.set_defaults(run=_cmd_demo)
    vllm_demo = sub.add_parser("vllm-demo", help="vLLM's engine serving a tiny DeepSeek-V4 on CPU: its NVIDIA model "
                               "through dsv4_xpu next to vLLM's CPU port (needs vLLM's CPU build)")
    vllm_demo.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per prompt (default: 8)")
    vllm_demo.add_argument("--model-dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    vllm_demo.set_defaults(run=_cmd_vllm_demo)
    passes = sub.add_parser("passes", help="list the rewrite passes in pipeline order")
    passes.set_defaults(run=_cmd_passes)
    constructs = sub.add_parser("constructs", help="vLLM's CUDA-only constructs and their handling per target "
                                "(the README's table, as markdown)")
    constructs.set_defaults(run=_cmd_constructs)
    coverage = sub.add_parser("coverage", help="build the installed vLLM's NVIDIA DeepSeek-V4 layer kinds, capture "
                              "them as the backend sees them, list each CUDA-only construct met and its handling "
                              "per target; exit 1 on an unknown construct or a refused layer")
    coverage.add_argument("kinds", nargs="*", help="layer kinds (default: all): window-hash, ratio4, ratio128, "
                          "window-bias")
    coverage.set_defaults(run=_cmd_coverage)

    diff = _subject_parser(sub, "diff", help="show what every pass does to a captured CUDA graph",
                           description="Capture the subject with CUDA semantics (fake tensors, no GPU needed), "
                           "rewrite it, and show per pass that changed it: op-count deltas and a unified diff.")
    diff.add_argument("--pass", dest="pass_name", choices=pass_names(), default=None, metavar="NAME",
                      help=f"show only this pass ({', '.join(pass_names())})")
    diff.add_argument("--device", choices=("xpu", "cpu", "cuda"), default="xpu", help="rewrite target (default: xpu)")
    diff.add_argument("--html", default=None, metavar="OUT.html", help="also save the output as HTML")
    diff.set_defaults(run=_cmd_diff)

    gen = _subject_parser(sub, "codegen", help="write Inductor's wrapper and Triton kernels for xpu/cuda (no GPU "
                          "needed)", description="Capture the subject with CUDA semantics, rewrite it for the device "
                          "and write the code Inductor generates (wrapper + Triton kernels), without the device.")
    gen.add_argument("--device", choices=("xpu", "cuda"), default="xpu", help="default: xpu")
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder")
    gen.add_argument("--compile", action="store_true", help="compile every config of every XPU kernel to SPIR-V "
                     "with Intel's Triton (no GPU needed); exits 1 naming each kernel that fails")
    gen.add_argument("--arch", action="append", default=[], metavar="ARCH", help="also compile to a native binary "
                     "for this Intel GPU architecture with ocloc, e.g. pvc, acm-g10 (repeatable; implies --compile)")
    gen.add_argument("--xpu-python", default=None, metavar="PYTHON", help="interpreter of the environment holding "
                     "triton-xpu (default: $DSV4_TRITON_XPU_PYTHON, else .venv-triton-xpu/bin/python)")
    gen.add_argument("--jobs", type=int, default=2, help="compile processes (default: 2)")
    gen.add_argument("--no-device-asserts", action="store_true", help="compile without Inductor's "
                     "indirect-indexing device asserts (Debian's 2022 ocloc aborts on them)")
    gen.set_defaults(run=_cmd_codegen)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsv4-compile` console script."""
    from dsv4_compile.errors import Dsv4CompileError

    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except Dsv4CompileError as exc:
        from rich.text import Text

        _console().print(Text.assemble(("error: ", "bold red"), str(exc)))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
