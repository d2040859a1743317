"""The XPU kernels Inductor generates for the model compile with Intel's Triton (triton-xpu), with no Intel GPU.

Generation runs here, in an environment with a current Triton (so the kernels carry its conventions); the
compile runs in the triton-xpu environment ($DSV4_TRITON_XPU_PYTHON or .venv-triton-xpu). Without that
environment the compile tests skip, except under CI=true, where they fail: `make test-triton-xpu`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._triton import has_triton_package

from dsv4_compile.tools import cli
from dsv4_compile.tools.codegen import CodegenResult, codegen
from dsv4_compile.tools.xpu_compile import (
    StaleKernelConventionsError,
    XpuCompileError,
    XpuToolchainError,
    check_kernel_conventions,
    compile_xpu_kernels,
    find_xpu_python,
    probe_toolchain,
)

pytestmark = [
    pytest.mark.skipif(not has_triton_package(), reason="generation needs a current Triton importable (.venv-triton:"
                       " `make test-triton-xpu`), else Inductor writes its older kernel conventions"),
    pytest.mark.skipif(torch.cuda.is_available() or torch.xpu.is_available(),
                       reason="covers machines without a GPU; with one, the model launches its own Triton kernels"),
]

PLANTED = "triton_poi_planted_0"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def xpu_python() -> Path:
    try:
        python = find_xpu_python()
        probe_toolchain(python)
        return python
    except XpuToolchainError as exc:
        missing = str(exc)
    if _in_ci():
        pytest.fail(f"CI=true: the triton-xpu tier must run, but {missing}", pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fresh for this module and shared by its compiles: a kernel that recurs (same source, same options)
    compiles once."""
    return tmp_path_factory.mktemp("triton_xpu_cache")


@pytest.fixture(scope="module")
def generated() -> Callable[[str, str], CodegenResult]:
    results: dict[tuple[str, str], CodegenResult] = {}

    def get(config: str, mode: str) -> CodegenResult:
        if (config, mode) not in results:
            subject = cli._subject(config, mode)
            results[config, mode] = codegen(subject.model, subject.inputs, device="xpu")
        return results[config, mode]

    return get


def _planted(result: CodegenResult) -> dict[str, str]:
    """One small real kernel, renamed, calling a libdevice function that does not exist."""
    name, source = next((n, s) for n, s in result.kernels.items() if n.startswith("triton_poi_"))
    source = source.replace(name, PLANTED)
    body = re.search(r"^(    )xoffset = .*$", source, re.M)
    assert body is not None
    source = source[:body.end()] + "\n    xoffset = libdevice.no_such_function(xoffset)" + source[body.end():]
    return {PLANTED: source}


def test_kernels_carry_the_current_conventions(generated):
    kernels = generated("tiny", "decode").kernels
    check_kernel_conventions(kernels)
    name, source = next((n, s) for n, s in kernels.items() if "'XBLOCK': 'constexpr'" in s)
    with pytest.raises(StaleKernelConventionsError, match=name):
        check_kernel_conventions({name: source.replace(", 'XBLOCK': 'constexpr'", "")})
    with pytest.raises(StaleKernelConventionsError, match="AttrsDescriptor"):
        check_kernel_conventions({name: source.replace("'configs': [", "'configs': [AttrsDescriptor(), ")})


def test_cli_compiles_tiny_prefill(xpu_python, tmp_path, capsys):
    """The documented command: every config of every kernel of the tiny model's prefill reaches SPIR-V."""
    code = cli.main(["codegen", "--device", "xpu", "--config", "tiny", "--mode", "prefill", "--out", str(tmp_path),
                     "--compile", "--xpu-python", str(xpu_python)])
    out = capsys.readouterr().out
    assert code == 0, out[-6000:]
    kernels = sorted(p.stem for p in (tmp_path / "kernels").glob("*.py"))
    assert kernels and f"{len(kernels)} XPU kernel(s)" in out and ", 0 failed" in out


@pytest.mark.parametrize(("config", "mode"), [("tiny", "decode"), ("flash_layer", "decode")])
def test_every_config_reaches_spirv(config, mode, generated, xpu_python, triton_cache):
    result = generated(config, mode)
    report = compile_xpu_kernels(result, python=xpu_python, cache_dir=triton_cache, check=False)
    assert [f.describe_failure() for f in report.failures] == []
    assert [r.kernel for r in report.results] == list(result.kernels)
    assert all(r.stage == "spv" and r.compiled == r.configs >= 1 for r in report.results)
    assert report.toolchain["triton"].startswith("3.") and "intel" in report.toolchain["backends"]


def test_planted_failure_raises_naming_the_kernel(generated, xpu_python, tmp_path):
    result = generated("tiny", "decode")
    healthy = [n for n in result.kernels if n.startswith("triton_")][-1]
    kernels = {healthy: result.kernels[healthy], **_planted(result)}
    with pytest.raises(XpuCompileError, match=rf"(?s){PLANTED}: failed in source.*no_such_function") as caught:
        compile_xpu_kernels(kernels, python=xpu_python, cache_dir=tmp_path)
    outcome = {r.kernel: r for r in caught.value.report.results}
    assert outcome[healthy].ok and outcome[healthy].stage == "spv"
    assert not outcome[PLANTED].ok and outcome[PLANTED].compiled == 0 and healthy not in str(caught.value)


def test_cli_exits_non_zero_naming_the_kernel(generated, xpu_python, tmp_path, monkeypatch, capsys):
    result = generated("tiny", "decode")
    healthy = [n for n in result.kernels if n.startswith("triton_")][-1]
    planted = dataclasses.replace(result, kernels={healthy: result.kernels[healthy], **_planted(result)})
    monkeypatch.setattr(cli, "_subject", lambda config, mode: cli.Subject("planted", lambda: None, ()))
    monkeypatch.setattr("dsv4_compile.tools.codegen.codegen", lambda *args, **kwargs: planted)
    code = cli.main(["codegen", "--device", "xpu", "--out", str(tmp_path), "--compile", "--xpu-python",
                     str(xpu_python)])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(rf"(?s)error: 1 of 2 XPU kernel.*{PLANTED}: failed in source.*no_such_function", out), out


@pytest.mark.skipif(shutil.which("ocloc") is None, reason="needs Intel's ocloc (Debian: intel-opencl-icd)")
def test_native_binary_for_pvc(generated, xpu_python, tmp_path):
    kernels = dict(list(generated("tiny", "decode").kernels.items())[:3])
    report = compile_xpu_kernels(kernels, archs=["pvc"], python=xpu_python, device_asserts=False,
                                 cache_dir=tmp_path)
    assert [r.stage for r in report.results] == ["native:pvc"] * 3


def test_arch_without_ocloc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(XpuToolchainError, match="ocloc"):
        compile_xpu_kernels({"k": "unused"}, archs=["pvc"])


def test_missing_environment_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DSV4_TRITON_XPU_PYTHON", raising=False)
    with pytest.raises(XpuToolchainError, match="--xpu-python"):
        find_xpu_python(tmp_path / "no_such_python")
