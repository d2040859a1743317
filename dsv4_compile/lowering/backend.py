"""The `dsv4_xpu` Dynamo backend: options -> rewrite pipeline -> Inductor.

Installed through the `torch_dynamo_backends` entry point, so `torch.compile(m, backend="dsv4_xpu")` works
after `pip install` with no import; `options={...}` of torch.compile arrive here as `options`.
Every pass's graph before/after goes to torch's structured log (artifacts `dsv4_xpu.<i>.<pass>.before/after`);
`options={"dump_dir": path}` also writes them, with diffs, as files (dsv4_compile.tools.diff).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from dsv4_compile.errors import DeviceError, Dsv4CompileError
from dsv4_compile.lowering.aliased_inputs import find_mixed_dtype_aliases, merge_mixed_dtype_aliases
from dsv4_compile.lowering.devices import device_available, input_devices, parse_device
from dsv4_compile.lowering.options import BackendOptions
from dsv4_compile.lowering.passes.narrow_matmuls import NarrowWidenedMatmuls
from dsv4_compile.lowering.pipeline import run_pipeline
from dsv4_compile.tools.diff import DiffRecorder

log = logging.getLogger(__name__)


def dsv4_xpu(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | BackendOptions | None = None,
) -> Callable[..., Any]:
    """Rewrite the CUDA-only constructs of `gm` for the target device, then compile it with Inductor."""
    opts = BackendOptions.from_mapping(options)
    device = resolve_device(opts.device, example_inputs)
    name = _graph_name()
    recorder = DiffRecorder(name, str(device), record=opts.dump_dir is not None)  # always: TORCH_TRACE artifacts
    try:
        report = run_pipeline(gm, device, strict=opts.strict, disable=opts.disable, name=name, observer=recorder,
                              providers=opts.providers)
    except Dsv4CompileError as exc:
        if opts.dump_dir is not None:
            recorder.write(opts.dump_dir, error=str(exc))
        raise
    if opts.dump_dir is not None:
        recorder.write(opts.dump_dir)
    if not opts.inductor:
        report.compiled_by = "eager (option inductor=False)"
        return gm
    groups = find_mixed_dtype_aliases(gm, example_inputs)
    if groups and opts.mixed_dtype_storage == "eager":
        names = ", ".join(member.name for group in groups for member in group.members)
        report.compiled_by = f"eager (inputs {names} view one storage in several dtypes; mixed_dtype_storage)"
        log.info("%s: %s", name, report.compiled_by)
        return gm
    from torch._inductor.compile_fx import compile_fx

    report.compiled_by = "inductor"

    def inductor(graph: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        return compile_fx(graph, inputs, config_patches=inductor_config_patches(opts, device.type))

    # AOTAutograd rejects mutated inputs that view one storage in different dtypes (vLLM's KV-cache buffer).
    return merge_mixed_dtype_aliases(gm, example_inputs, inductor, groups) if groups else inductor(
        gm, list(example_inputs))


def inductor_config_patches(options: BackendOptions, device_type: str | None = None) -> dict[str, Any]:
    """The Inductor config this backend compiles a rewritten graph under.

    `exact_rounding`: `emulate_precision_casts`, so a fused kernel rounds each fp16/bf16 result where eager
    PyTorch rounds it (a lowering's explicit `.to(dtype)` included) instead of carrying it in fp32, and Triton
    kernels are built without FMA contraction, which can fuse a rounding away. Inductor's FX-graph cache key
    holds its config, so code compiled with and without it is never shared.
    `cudagraphs`: Inductor's `triton.cudagraphs` (cudagraph trees).
    With a `device_type`: the `narrow_matmuls` post-grad pass (passes/narrow_matmuls.py) for that target.
    """
    patches: dict[str, Any] = {"emulate_precision_casts": True} if options.exact_rounding else {}
    if options.cudagraphs:
        patches["triton.cudagraphs"] = True
    if device_type is not None:
        patches["post_grad_custom_pre_pass"] = NarrowWidenedMatmuls(device_type)
    return patches


def resolve_device(requested: str | None, example_inputs: Sequence[Any]) -> torch.device:
    """The target device: `requested` if given, else the example inputs' device; checked for consistency."""
    devices = input_devices(example_inputs)
    if len({d.type for d in devices}) > 1:
        raise DeviceError(f"example inputs live on several devices {sorted(map(str, devices))}; "
                          "move them to one device (0-dim CPU scalars are fine)")
    if requested is not None:
        device = parse_device(requested)
        if devices and next(iter(devices)).type != device.type:
            missing = "" if device_available(device) else f" (and '{device}' is not available in this process)"
            raise DeviceError(f"options device={str(device)!r} but the inputs live on {next(iter(devices))}{missing}")
    else:
        device = next(iter(devices)) if devices else torch.device("cpu")
    if not device_available(device):
        raise DeviceError(f"target device '{device}' is not available in this process "
                          f"(torch.{device.type}.is_available() is False)")
    return device


def _graph_name() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return f"graph {compile_id}" if compile_id is not None else "graph"
