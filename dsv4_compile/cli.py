"""The `dsv4-compile` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dsv4-compile` console script."""
    parser = argparse.ArgumentParser(prog="dsv4-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small CUDA-oriented block on the local device and check parity")
    demo.add_argument("--device", default=None, help="target device (default: cuda/xpu if present, else cpu)")
    sub.add_parser("passes", help="list the rewrite passes in pipeline order")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dsv4_compile.demo import run_demo

        return run_demo(args.device)
    from dsv4_compile.pipeline import PASSES

    for i, spec in enumerate(PASSES, 1):
        print(f"{i}. {spec.name:<26} {spec.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
