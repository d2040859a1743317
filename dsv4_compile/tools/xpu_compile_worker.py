"""Compile Inductor's XPU Triton kernel modules with Intel's Triton on a machine with no Intel GPU.

Runs with the interpreter of an environment that holds Intel's Triton (`triton-xpu`) and CPU torch, as a file
(`python xpu_compile_worker.py --out RESULTS.jsonl KERNEL.py ...`): it imports neither dsv4_compile nor
anything but torch and Triton. Each kernel module is imported as Inductor imports it (its decorator builds the
`CachingAutotuner` and its configs with Inductor's own heuristics), then every config goes through the
autotuner's `_precompile_config`, the ahead-of-time compile Inductor runs before a first launch, down to
SPIR-V; nothing is loaded or launched. With `--arch`, each config's SPIR-V is also compiled to a native
binary with `ocloc` for those architectures. One JSON line per kernel is appended to `--out` as soon as that
kernel is done, so a timeout still leaves the finished ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Inductor would ask Triton 3.3 for a native binary through `ocloc -o`, which current ocloc rejects; the native
# step below calls ocloc itself, for the named architectures. Read at import of Inductor's runtime.
os.environ["TORCHINDUCTOR_XPU_KERNEL_FORMAT"] = "spv"

TRITON_STAGES = ("ttir", "ttgir", "llir", "spv")
_MESSAGE_LIMIT = 4000
# What the compiler's C++ side prints on failure (MLIR diagnostics, LLVM assertions), not its IR dumps.
_DIAGNOSTIC = re.compile(r"error|assert|fail|unsupported|invalid", re.I)


class _StageTracker:
    """Which of the Intel backend's stages the compile in progress last entered."""

    def __init__(self) -> None:
        self.stage = "source"

    def wrap(self, name: str, stage: Any) -> Any:
        def run(src: Any, metadata: Any) -> Any:
            self.stage = name
            return stage(src, metadata)

        return run


class _NoSyclArchParser:
    """Stands in for the SYCL module the Intel backend builds only to name the GPU architecture; an empty
    name keeps the device properties of the kernel's own metadata (no `ocloc query` of extensions)."""

    @staticmethod
    def parse_device_arch(architecture: int) -> str:
        return ""


def _prepare_triton(tracker: _StageTracker) -> None:
    """Let Intel's Triton compile with no SYCL runtime or GPU driver, recording stages as they start."""
    import triton.backends
    from torch._inductor.runtime import triton_helpers

    if "intel" not in triton.backends.backends:
        raise RuntimeError(f"this Triton ({triton.__version__}, {triton.__file__}) has no Intel backend: "
                           "install triton-xpu in this environment")
    backend = triton.backends.backends["intel"].compiler
    real_compile_module = backend.__init__.__globals__["compile_module_from_src"]

    def compile_module_from_src(src: str, name: str) -> Any:
        return _NoSyclArchParser() if name == "arch_utils" else real_compile_module(src, name)

    # The backend module is loaded from its file, not by import name: patch the globals its methods see.
    backend.__init__.__globals__["compile_module_from_src"] = compile_module_from_src
    add_stages = backend.add_stages

    def tracked_add_stages(self: Any, stages: dict[str, Any], options: Any, *args: Any) -> None:
        add_stages(self, stages, options, *args)
        for name in list(stages):
            stages[name] = tracker.wrap(name, stages[name])

    backend.add_stages = tracked_add_stages
    triton_helpers.set_driver_to_gpu = lambda: None  # no GPU driver to activate; nothing is launched


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"dsv4_xpu_kernel_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _autotuner(module: Any) -> Any:
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found = [v for v in vars(module).values() if isinstance(v, CachingAutotuner)]
    if len(found) != 1:
        raise RuntimeError(f"expected one Inductor kernel (CachingAutotuner) in the module, found {len(found)}")
    return found[0]


@contextlib.contextmanager
def _without_device_asserts(autotuner: Any) -> Iterator[None]:
    create = autotuner._create_compile_options

    def options(cfg: Any, compile_meta: dict[str, Any]) -> dict[str, Any]:
        return {**create(cfg, compile_meta), "debug": False}

    autotuner._create_compile_options = options
    try:
        yield
    finally:
        autotuner._create_compile_options = create


def _ocloc(spirv: bytes, build_flags: str, arch: str, work: Path) -> None:
    """SPIR-V -> native binary for `arch`, in the option spelling current ocloc releases accept."""
    source = work / "kernel.spv"
    source.write_bytes(spirv)
    cmd = ["ocloc", "compile", "-file", str(source), "-spirv_input", "-device", arch, "-output", "kernel",
           "-out_dir", str(work), "-output_no_suffix"]
    if build_flags:
        cmd += ["-options", build_flags]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        how = (f"was killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else f"exited with {done.returncode}")
        output = (done.stdout + done.stderr).strip()[-_MESSAGE_LIMIT:] or "(no output)"
        raise RuntimeError(f"ocloc -device {arch} {how}: {output}")


@contextlib.contextmanager
def _native_stderr() -> Iterator[Any]:
    """Capture file descriptor 2, where MLIR and LLVM write their diagnostics."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _diagnostics(sink: Any) -> str:
    sink.seek(0)
    lines = sink.read().decode(errors="replace").splitlines()
    kept = [line for line in lines if _DIAGNOSTIC.search(line) and "pipeline: " not in line and len(line) < 1000]
    return "\n".join(kept)[-_MESSAGE_LIMIT:]


def compile_kernel(path: Path, archs: list[str], device_asserts: bool, tracker: _StageTracker) -> dict[str, Any]:
    """One kernel module, every config: what it reached, in how long, and the first failure."""
    with _native_stderr() as sink:
        result = _compile_kernel(path, archs, device_asserts, tracker)
        if result["error"] is not None:
            result["diagnostics"] = _diagnostics(sink)
    return result


def _compile_kernel(path: Path, archs: list[str], device_asserts: bool, tracker: _StageTracker) -> dict[str, Any]:
    result: dict[str, Any] = {"kernel": path.stem, "configs": 0, "compiled": 0, "stage": "none", "error": None}
    start = time.perf_counter()
    tracker.stage = "import"
    try:
        autotuner = _autotuner(_load(path))
        result["custom"] = bool(getattr(autotuner, "custom_kernel", False))
        result["configs"] = len(autotuner.configs)
        stage = "spv"
        with contextlib.ExitStack() as stack:
            if not device_asserts:
                stack.enter_context(_without_device_asserts(autotuner))
            for index, cfg in enumerate(autotuner.configs):
                tracker.stage = "source"
                compiled = autotuner._precompile_config(cfg)
                binary = compiled.kernel
                if "spv" not in binary.asm:  # (a Triton cache hit runs no stage)
                    raise RuntimeError(f"config {index} stopped after stage {tracker.stage!r}, with no SPIR-V")
                for arch in archs:
                    tracker.stage = f"native:{arch}"
                    with tempfile.TemporaryDirectory() as work:
                        _ocloc(binary.asm["spv"], binary.metadata.build_flags, arch, Path(work))
                    stage = "native:" + ",".join(archs)
                result["compiled"] = index + 1
        result["stage"] = stage
    except Exception as exc:  # every failure is reported, with the compiler's message
        result["stage"] = _last_completed(tracker.stage)
        result["failed_in"] = tracker.stage
        result["error"] = f"{type(exc).__name__}: {exc}"[-_MESSAGE_LIMIT:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _last_completed(failed_in: str) -> str:
    if failed_in in TRITON_STAGES:
        index = TRITON_STAGES.index(failed_in)
        return TRITON_STAGES[index - 1] if index else "source"
    return "spv" if failed_in.startswith("native:") else "none"


def _probe() -> dict[str, Any]:
    import torch
    import triton
    import triton.backends

    return {"triton": triton.__version__, "torch": torch.__version__, "backends": sorted(triton.backends.backends),
            "python": sys.executable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", type=Path, help="Inductor kernel modules (.py)")
    parser.add_argument("--out", type=Path, help="JSON lines, one per kernel")
    parser.add_argument("--probe", action="store_true", help="print the versions of Triton and torch as JSON")
    parser.add_argument("--arch", action="append", default=[], help="also compile to a native binary (ocloc)")
    parser.add_argument("--no-device-asserts", action="store_true",
                        help="compile without Inductor's device asserts (its indirect-indexing checks)")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(_probe()))
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.arch and shutil.which("ocloc") is None:
        parser.error("--arch needs ocloc on PATH")
    tracker = _StageTracker()
    _prepare_triton(tracker)
    logging.getLogger("torch._inductor.runtime.triton_heuristics").setLevel(logging.CRITICAL)  # reported below
    with args.out.open("a") as out:
        for path in args.kernels:
            out.write(json.dumps(compile_kernel(path, args.arch, not args.no_device_asserts, tracker)) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
