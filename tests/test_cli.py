"""The dsv4-compile command: every subcommand runs and has --help."""

from __future__ import annotations

import pytest

from dsv4_compile.lowering.pipeline import pass_names
from dsv4_compile.tools.cli import _subject, main
from tests.conftest import needs_trace_time_retarget


@pytest.mark.parametrize("command", ["demo", "vllm-demo", "passes", "diff", "codegen"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dsv4-compile {command}")
    if command in ("diff", "codegen"):
        assert "shrunk to 2 layers" in " ".join(out.split()) and "CudaDeepseekV4" in out


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "vllm-demo", "passes", "diff", "codegen"))


def test_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in pass_names())
    assert "activation" in out and "_C::silu_and_mul_with_clamp" in out and "dsv4_cuda::mhc_pre" in out
    assert "narrow_matmuls" in out and "inside Inductor" in out


def test_diff_shows_every_pass_that_changed(capsys):
    assert main(["diff", "--config", "tiny", "--mode", "prefill"]) == 0
    out = capsys.readouterr().out
    for title in ("1. aux_streams: matched", "2. lower_ops: matched 46, changed 46", "device_constants"):
        assert title in out
    assert "op-count delta" in out and "+++ 02.lower_ops.after.py" in out


def test_diff_of_one_pass_to_html(tmp_path, capsys):
    html = tmp_path / "diff.html"
    assert main(["diff", "--mode", "decode", "--pass", "device_constants", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "device_constants: matched" in out and "lower_ops: matched" not in out
    assert "<html" in html.read_text() and "device_constants" in html.read_text()


def test_diff_of_a_pass_that_changed_nothing(capsys):
    assert main(["diff", "--pass", "pdl"]) == 0
    assert "pass pdl changed nothing" in " ".join(capsys.readouterr().out.split())


def test_unknown_pass_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["diff", "--pass", "no_such_pass"])
    assert "invalid choice" in capsys.readouterr().err


# The CLI is the same for both devices; cuda's run (a minute on 2 cores) is in the slow tier, and tests/test_codegen.py
# generates cuda code in CI.
@pytest.mark.parametrize("device", ["xpu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_codegen_writes_wrapper_and_kernels(device, tmp_path, capsys):
    assert main(["codegen", "--device", device, "--config", "tiny", "--out", str(tmp_path)]) == 0
    assert f"device_str='{device}'" in (tmp_path / "wrapper.py").read_text()
    kernels = list((tmp_path / "kernels").glob("*.py"))
    assert kernels and all("@triton.jit" in k.read_text() for k in kernels)
    assert f"{len(kernels)} Triton kernel(s)" in capsys.readouterr().out


def test_subject_shapes():
    tiny, flash = _subject("tiny", "decode"), _subject("flash", "prefill")
    assert tiny.inputs[0].shape == (2,) and flash.inputs[0].shape == (16,)
    assert flash.model.__self__.model.config.hidden_size == 4096


@pytest.mark.slow  # the demo compiles a whole model with Inductor (tens of seconds on 2 cores)
@needs_trace_time_retarget
def test_demo_on_cpu(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    assert "dsv4_xpu demo" in capsys.readouterr().out
