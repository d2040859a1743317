"""Compile the XPU kernels that `codegen` wrote with Intel's Triton, on a machine with no Intel GPU.

Intel's Triton (`triton-xpu`) imports as `triton`, so it lives in an environment of its own (with CPU torch,
whose Inductor runtime the kernel modules import): `compile_xpu_kernels` writes the kernels to a folder and
runs xpu_compile_worker.py with that environment's interpreter, `jobs` processes at a time. The worker
compiles every Inductor config of every kernel to SPIR-V the way Inductor's precompile does, and, for each
architecture in `archs`, to a native binary with `ocloc`. The interpreter is `python=`, else
$DSV4_TRITON_XPU_PYTHON, else the repository's `.venv-triton-xpu` (`make .venv-triton-xpu/.installed`).

Before anything is compiled, the kernel text must carry the conventions Inductor uses when a current Triton is
importable (dict-style attributes, constexpr arguments in the signature); the older form it falls back to
without Triton fails with StaleKernelConventionsError, since it would not be what a real XPU install runs.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsv4_compile.errors import Dsv4CompileError
from dsv4_compile.tools.codegen import CodegenResult

XPU_PYTHON_ENV = "DSV4_TRITON_XPU_PYTHON"
WORKER = Path(__file__).with_name("xpu_compile_worker.py")
REPO_XPU_PYTHON = Path(__file__).resolve().parents[2] / ".venv-triton-xpu" / "bin" / "python"


class XpuToolchainError(Dsv4CompileError):
    """Intel's Triton environment (or ocloc, for native binaries) is missing or unusable."""


class StaleKernelConventionsError(Dsv4CompileError):
    """Kernel text in the form Inductor writes only when no Triton is importable."""


@dataclasses.dataclass(frozen=True)
class KernelCompileResult:
    """One kernel: its configs, how many compiled, the last stage all of them reached, and the first failure."""

    kernel: str
    configs: int
    compiled: int
    stage: str
    seconds: float
    error: str | None = None
    failed_in: str | None = None
    diagnostics: str = ""
    custom: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe_failure(self) -> str:
        lines = [f"{self.kernel}: failed in {self.failed_in} ({self.compiled}/{self.configs} configs compiled): "
                 f"{self.error}"]
        lines += [f"    {line}" for line in self.diagnostics.splitlines()]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class XpuCompileReport:
    """What Intel's Triton made of a set of kernels."""

    results: tuple[KernelCompileResult, ...]
    archs: tuple[str, ...]
    seconds: float
    toolchain: Mapping[str, Any]

    @property
    def failures(self) -> tuple[KernelCompileResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def config_count(self) -> int:
        return sum(r.configs for r in self.results)


class XpuCompileError(Dsv4CompileError):
    """At least one kernel did not compile; the message names each and quotes the compiler."""

    def __init__(self, report: XpuCompileReport) -> None:
        self.report = report
        failures = report.failures
        super().__init__("\n".join([f"{len(failures)} of {len(report.results)} XPU kernel(s) did not compile with "
                                    f"Intel's Triton {report.toolchain.get('triton', '?')}:",
                                    *(f.describe_failure() for f in failures)]))


def find_xpu_python(explicit: str | Path | None = None) -> Path:
    """The interpreter of the environment holding Intel's Triton: `explicit`, $DSV4_TRITON_XPU_PYTHON, or the
    repository's .venv-triton-xpu."""
    chosen = explicit or os.environ.get(XPU_PYTHON_ENV)
    path = Path(chosen) if chosen else REPO_XPU_PYTHON
    if not path.exists():
        how = f"{path} does not exist" if chosen else f"no --xpu-python, no ${XPU_PYTHON_ENV} and no {path}"
        raise XpuToolchainError(f"Intel's Triton environment not found: {how}. Create it with "
                                "`make .venv-triton-xpu/.installed` (torch CPU + `pip install --pre "
                                "triton-xpu==3.3.0b1`) or name an interpreter with --xpu-python / "
                                f"${XPU_PYTHON_ENV}.")
    return path


def probe_toolchain(python: Path) -> dict[str, Any]:
    """Versions of Triton and torch in the Intel environment; raises if it has no Intel backend."""
    done = subprocess.run([str(python), str(WORKER), "--probe"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise XpuToolchainError(f"{python} cannot run the XPU compile worker:\n{done.stderr.strip()[-2000:]}")
    toolchain = json.loads(done.stdout.strip().splitlines()[-1])
    if "intel" not in toolchain["backends"]:
        raise XpuToolchainError(f"the Triton of {python} ({toolchain['triton']}) has no Intel backend: it is not "
                                "triton-xpu")
    return toolchain


def check_kernel_conventions(kernels: Mapping[str, str]) -> None:
    """Raise StaleKernelConventionsError unless every kernel is in the form Inductor writes with a current Triton
    importable: no `AttrsDescriptor(...)` and every argument of the `@triton.jit` function, constexprs
    included, named in `triton_meta['signature']`."""
    problems = []
    for name, source in kernels.items():
        if "AttrsDescriptor(" in source:
            problems.append(f"{name}: configs built with AttrsDescriptor(...)")
            continue
        try:
            params, signature = _jit_params_and_signature(source)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        missing = [p for p in params if p not in signature]
        wrong = [p for p, constexpr in params.items() if constexpr and signature.get(p, "constexpr") != "constexpr"]
        if missing or wrong:
            problems.append(f"{name}: signature {sorted(signature)} lacks {missing}"
                            + (f", types constexpr args {wrong} otherwise" if wrong else ""))
    if problems:
        raise StaleKernelConventionsError(
            "the kernels are not in the form Inductor generates with a current Triton importable (generate them "
            "in an environment with Triton installed, such as .venv-triton):\n"
            + "\n".join(f"  - {p}" for p in problems[:20]))


def _jit_params_and_signature(source: str) -> tuple[dict[str, bool], dict[str, str]]:
    """({argument: is constexpr}, triton_meta's signature) of a kernel module."""
    tree = ast.parse(source)
    for fn in (f for f in tree.body if isinstance(f, ast.FunctionDef)):  # helpers are plain @triton.jit
        for decorator in fn.decorator_list:
            for keyword in getattr(decorator, "keywords", []):
                if keyword.arg == "triton_meta" and isinstance(keyword.value, ast.Dict):
                    params = {a.arg: a.annotation is not None and ast.unparse(a.annotation).endswith("constexpr")
                              for a in fn.args.args}
                    for key, value in zip(keyword.value.keys, keyword.value.values):
                        if isinstance(key, ast.Constant) and key.value == "signature":
                            signature = ast.literal_eval(value)
                            return params, {str(k): str(v) for k, v in signature.items()}
    raise ValueError("no triton_meta['signature'] in the kernel's decorator")


def compile_xpu_kernels(
    kernels: Mapping[str, str] | CodegenResult,
    *,
    archs: Sequence[str] = (),
    python: str | Path | None = None,
    jobs: int = 2,
    device_asserts: bool = True,
    cache_dir: str | Path | None = None,
    timeout_s: float = 1800,
    check: bool = True,
) -> XpuCompileReport:
    """Compile every config of every kernel to SPIR-V with Intel's Triton (and to native binaries for `archs`
    with ocloc). Raises XpuCompileError naming each kernel that failed (unless `check=False`).

    `device_asserts=False` drops Inductor's indirect-indexing asserts (Debian's 2022 ocloc aborts on them).
    `cache_dir`: Triton's cache, shared by calls that pass the same folder (identical kernels then compile
    once); by default a fresh one, so that every kernel is compiled.
    """
    if isinstance(kernels, CodegenResult):
        if not kernels.device.startswith("xpu"):
            raise ValueError(f"these kernels were generated for {kernels.device}, not xpu")
        kernels = kernels.kernels
    if archs and shutil.which("ocloc") is None:
        raise XpuToolchainError(f"native binaries for {list(archs)} need Intel's `ocloc` on PATH (Debian: "
                                "`apt-get install intel-opencl-icd`); without --arch the kernels stop at SPIR-V")
    check_kernel_conventions(kernels)
    interpreter = find_xpu_python(python)
    toolchain = probe_toolchain(interpreter)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsv4_xpu_compile_") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir or work / "triton_cache")}
        paths = []
        for name, source in kernels.items():
            (path := work / f"{name}.py").write_text(source)
            paths.append(path)
        results = _run_workers(interpreter, _balanced(paths, max(1, jobs)), work, env, archs, device_asserts,
                               timeout_s)
    report = XpuCompileReport(tuple(results[name] for name in kernels), tuple(archs),
                              round(time.perf_counter() - start, 2), toolchain)
    if check and not report.ok:
        raise XpuCompileError(report)
    return report


def _balanced(paths: list[Path], jobs: int) -> list[list[Path]]:
    """Split the kernels into `jobs` lists of about equal source size (a stand-in for compile time)."""
    buckets: list[list[Path]] = [[] for _ in range(min(jobs, len(paths)))]
    sizes = [0] * len(buckets)
    for path in sorted(paths, key=lambda p: -p.stat().st_size):
        i = sizes.index(min(sizes))
        buckets[i].append(path)
        sizes[i] += path.stat().st_size
    return buckets


def _run_workers(python: Path, buckets: list[list[Path]], work: Path, env: dict[str, str], archs: Sequence[str],
                 device_asserts: bool, timeout_s: float) -> dict[str, KernelCompileResult]:
    flags = [f"--arch={a}" for a in archs] + ([] if device_asserts else ["--no-device-asserts"])
    running = []
    for i, bucket in enumerate(buckets):
        out, log = work / f"results_{i}.jsonl", (work / f"worker_{i}.log").open("w")
        cmd = [str(python), str(WORKER), "--out", str(out), *flags, *map(str, bucket)]
        running.append((bucket, out, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    deadline = time.monotonic() + timeout_s
    results: dict[str, KernelCompileResult] = {}
    for bucket, out, log, process in running:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
            why = f"the worker exited with {process.returncode}"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            why = f"the worker ran past {timeout_s:.0f} s"
        log.close()
        lines = out.read_text().splitlines() if out.exists() else []
        for line in lines:
            fields = json.loads(line)
            results[fields["kernel"]] = KernelCompileResult(**{f.name: fields[f.name] for f in
                                                               dataclasses.fields(KernelCompileResult)
                                                               if f.name in fields})
        tail = Path(log.name).read_text()[-2000:]
        for path in bucket:
            if path.stem not in results:
                results[path.stem] = KernelCompileResult(path.stem, 0, 0, "none", 0.0, error=f"no result: {why}",
                                                         failed_in="worker", diagnostics=tail)
    return results

