"""Inductor's code for XPU (or CUDA) without the hardware: the wrapper and the Triton kernels, as text.

`codegen(model_or_gm, inputs, device="xpu")` captures the model with CUDA semantics (dsv4_compile.frontend.capture),
rewrites it for the device, and lowers it the way Inductor does (aot_autograd with Inductor's
decompositions, post-grad passes, `GraphLowering.run()` and `.codegen()`) on fake tensors. Nothing is
compiled or run, so neither the device nor Triton has to be present; where Triton is installed (GPU or not),
Inductor writes the kernels in its conventions, else in older ones. Where the device is absent, its
`DeviceInterface` (is_available, device properties, compute capability, current device), Inductor's
Triton check and `triton_hash_with_backend` are patched for the duration of the call only.
For a non-CUDA device the code must not call anything CUDA-only, else CudaOnlyCodeError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv4_compile.errors import DeviceError, Dsv4CompileError
from dsv4_compile.frontend.capture import capture, example_inputs, rewrite
from dsv4_compile.lowering.backend import inductor_config_patches
from dsv4_compile.lowering.devices import parse_device
from dsv4_compile.lowering.options import BackendOptions
from dsv4_compile.lowering.passes.audit import INDUCTOR_NAMESPACES, has_kernel_for, overloads_of
from dsv4_compile.lowering.registry import LOWERINGS
from dsv4_compile.lowering.report import RewriteReport
from dsv4_compile.tools.fake_devices import fake_device_support

CODEGEN_DEVICES = ("xpu", "cuda")

# (what it is, pattern); matched against non-comment lines of the generated code.
CUDA_ONLY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torch.cuda API", re.compile(r"\btorch\.cuda\b")),
    ("CUDA stream handle", re.compile(r"_cuda_getCurrentRawStream")),
    ("CUDA allocation", re.compile(r"\bempty_strided_cuda\(")),
    ("cuda device", re.compile(r"device\(type='cuda'|device=['\"]cuda|device_str=['\"]cuda|type='cuda'")),
    ("programmatic dependent launch", re.compile(r"['\"]?launch_pdl['\"]?\s*[:=]\s*True")),
    ("GDC (PDL) in a kernel", re.compile(r"['\"]?USE_GDC['\"]?\s*[:=]\s*True")),
    ("stream op", re.compile(r"torch\.ops\.streams\.\w+|(?<![\w.])streams\.\w+")),
    # neither Triton's Intel backend nor its SPIR-V stage rejects PTX text in a kernel
    ("inline assembly (PTX)", re.compile(r"\binline_asm_elementwise\(")),
)

_OP_CALL = re.compile(r"torch\.ops\.(\w+)\.(\w+)")
_BARE_OP_CALL = re.compile(r"(?<![\w.])(\w+)\.(\w+)\(")  # `_C.op(...)`: counted for lowered namespaces only
# Inductor's own helper namespaces in wrapper code.
_WRAPPER_NAMESPACES = INDUCTOR_NAMESPACES | {"inductor", "higher_order", "_inductor_test"}

_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''\n(.*?)''', device_str='\w+'\)", re.S | re.M)


@dataclasses.dataclass(frozen=True)
class CodeFinding:
    """One CUDA-only mention in generated code."""

    line_no: int
    line: str
    why: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.line.strip()}  ({self.why})"


class CudaOnlyCodeError(Dsv4CompileError):
    """Generated code for a non-CUDA device still calls something CUDA-only."""

    def __init__(self, findings: list[CodeFinding], device: str) -> None:
        self.findings = findings
        shown = [f"  - {f}" for f in findings[:20]]
        more = [f"  ... and {len(findings) - 20} more"] if len(findings) > 20 else []
        super().__init__("\n".join([f"the code generated for '{device}' has {len(findings)} CUDA-only "
                                    "mention(s):", *shown, *more]))


@dataclasses.dataclass(frozen=True)
class CodegenResult:
    """What Inductor generated for one graph: the wrapper (kernels inlined), each Triton kernel, the graphs."""

    device: str
    wrapper: str
    kernels: dict[str, str]
    graph: str
    aten_graph: str
    report: RewriteReport
    findings: tuple[CodeFinding, ...] = ()

    @property
    def kernel_count(self) -> int:
        return len(self.kernels)

    @property
    def source(self) -> str:
        """The full generated module (wrapper with the kernels' source inlined)."""
        return self.wrapper

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write wrapper.py, kernels/<name>.py, graph.py (rewritten), aten_graph.py and report.txt."""
        out = Path(out_dir)
        (out / "kernels").mkdir(parents=True, exist_ok=True)
        files = {out / "wrapper.py": self.wrapper, out / "graph.py": self.graph,
                 out / "aten_graph.py": self.aten_graph, out / "report.txt": f"{self.report}\n"}
        files.update({out / "kernels" / f"{name}.py": src for name, src in self.kernels.items()})
        for path, text in files.items():
            path.write_text(text)
        return list(files)


def codegen(
    model_or_gm: Callable[..., Any] | torch.fx.GraphModule,
    inputs: Sequence[Any] | None = None,
    device: str | torch.device = "xpu",
    *,
    strict: bool = True,
    disable: Sequence[str] = (),
    exact_rounding: bool = True,
) -> CodegenResult:
    """Inductor's wrapper and Triton kernels for `device` ('xpu' or 'cuda'); no such hardware needed, under the
    Inductor config the backend compiles with (`exact_rounding`: see BackendOptions).

    `model_or_gm`: a CUDA-oriented model (captured with `inputs`, see dsv4_compile.frontend.capture) or a graph
    from `capture` (`inputs` then default to the ones it was captured with). Raises CudaOnlyCodeError if
    the code for a non-CUDA device mentions anything CUDA-only (see CUDA_ONLY_PATTERNS).
    """
    target = parse_device(device)
    if target.type not in CODEGEN_DEVICES:
        raise DeviceError(f"codegen supports {list(CODEGEN_DEVICES)}, not {str(target)!r}")
    target = torch.device(target.type, target.index or 0)
    if isinstance(model_or_gm, torch.fx.GraphModule):
        gm, example = model_or_gm, list(inputs) if inputs is not None else example_inputs(model_or_gm)
    else:
        if inputs is None:
            raise TypeError("codegen of a model needs its example inputs")
        gm = capture(model_or_gm, *inputs)
        example = example_inputs(gm)
    rewritten, report = rewrite(gm, target, strict=strict, disable=disable, name=f"codegen for {target.type}")
    patches = inductor_config_patches(BackendOptions(exact_rounding=exact_rounding), target.type)
    with torch._inductor.config.patch(patches):
        wrapper, aten_graph = _lower(rewritten, example, target)
    findings = tuple(find_cuda_only_code(wrapper, target.type))
    if findings and target.type != "cuda":
        raise CudaOnlyCodeError(list(findings), str(target))
    kernels = {m.group(1): m.group(2) for m in _KERNEL.finditer(wrapper)}
    return CodegenResult(str(target), wrapper, kernels, rewritten.code, aten_graph, report, findings)


def find_cuda_only_code(code: str, device_type: str = "xpu") -> list[CodeFinding]:
    """Every non-comment line of `code` that mentions something CUDA-only: a pattern of CUDA_ONLY_PATTERNS,
    or a custom op that has a registered lowering or no kernel for `device_type` (the audit's rule)."""
    findings = []
    for line_no, line in enumerate(code.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        findings += [CodeFinding(line_no, line, why) for why, pattern in CUDA_ONLY_PATTERNS if pattern.search(line)]
        findings += [CodeFinding(line_no, line, why) for why in _custom_op_problems(line, device_type)]
    return findings


def _custom_op_problems(line: str, device_type: str) -> list[str]:
    problems = []
    lowered = {qualname.split("::")[0] for qualname in LOWERINGS}
    calls = _OP_CALL.findall(line) + [(ns, op) for ns, op in _BARE_OP_CALL.findall(line) if ns in lowered]
    for namespace, name in calls:
        if namespace in _WRAPPER_NAMESPACES:
            continue
        qualname = f"{namespace}::{name}"
        packet = getattr(getattr(torch.ops, namespace, None), name, None)
        if qualname in LOWERINGS:
            problems.append(f"CUDA-only custom op {qualname} (it has a native lowering)")
        elif packet is None or not any(has_kernel_for(o, device_type) for o in overloads_of(packet)):
            problems.append(f"custom op {qualname} has no {device_type} kernel")
    return problems


def _lower(gm: torch.fx.GraphModule, example: Sequence[Any], device: torch.device) -> tuple[str, str]:
    """Run aot_autograd + Inductor's lowering and codegen on fake inputs; returns (wrapper, aten graph)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    fake_mode = FakeTensorMode()
    out: dict[str, str] = {}

    def lower(fw_gm: torch.fx.GraphModule, fw_inputs: Sequence[Any]) -> Callable[..., Any]:
        post_grad_passes(fw_gm, True)
        graph = GraphLowering(fw_gm, example_inputs=fw_inputs, is_inference=True)
        with V.set_graph_handler(graph):
            graph.run(*fw_inputs)
            wrapper, _ = graph.codegen()
        out["wrapper"], out["aten"] = getattr(wrapper, "value", wrapper), fw_gm.code
        return _not_runnable

    with contextlib.ExitStack() as stack:
        _patch_missing_backend(stack, device)
        stack.enter_context(torch.no_grad())
        stack.enter_context(fake_device_support())
        with fake_mode:
            fake_inputs = [torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)
                           if isinstance(t, torch.Tensor) else t for t in example]
        stack.enter_context(V.set_fake_mode(fake_mode))
        stack.enter_context(DebugContext())
        aot_module_simplified(gm, fake_inputs, fw_compiler=lower, decompositions=select_decomp_table())
    return out["wrapper"], out["aten"]


def _not_runnable(*args: Any) -> Any:
    raise RuntimeError("dsv4_compile.tools.codegen produces source text only; this graph was not compiled")


def _patch_missing_backend(stack: contextlib.ExitStack, device: torch.device) -> None:
    """Pretend `device` (and Triton) exist, for Inductor's codegen only, where they do not."""
    from torch._dynamo.device_interface import get_interface_for_device
    from torch._inductor import scheduler
    from torch._inductor.runtime.hints import DeviceProperties
    from torch.utils._triton import has_triton_package

    interface = get_interface_for_device(device.type)
    available = interface.is_available()
    if not available:
        props = _fake_properties(device.type)
        cc = 90 if device.type == "cuda" else {k: v for k, v in vars(props).items()}
        for owner, name, value in (
            (interface, "is_available", lambda: True),
            (interface, "get_device_properties", lambda device=None: props),
            (interface, "get_compute_capability", lambda device=None: cc),
            (interface, "current_device", lambda: 0),
            (interface.Worker, "get_device_properties", lambda device=None: props),
            (interface.Worker, "current_device", lambda: 0),
        ):
            stack.enter_context(mock.patch.object(owner, name, staticmethod(value)))
        # Inductor also asks torch.cuda / torch.xpu directly (TMA checks, fp64 support); never is_available.
        capability = (props.major, props.minor) if device.type == "cuda" else cc
        for name, value in (("get_device_capability", lambda device=None: capability),
                            ("get_device_properties", lambda device=None: props),
                            ("current_device", lambda: 0)):
            stack.enter_context(mock.patch.object(getattr(torch, device.type), name, value))
        stack.callback(DeviceProperties.create.cache_clear)  # it memoises the fake properties
    if not available or not has_triton_package():
        stack.enter_context(mock.patch.object(scheduler, "has_triton", lambda: True))
        stack.enter_context(mock.patch("torch.utils._triton.triton_hash_with_backend", lambda: "DSV4_CODEGEN_ONLY"))
    if has_triton_package() and not available:
        _patch_triton_target(stack)


def _patch_triton_target(stack: contextlib.ExitStack) -> None:
    """Where Triton is installed but no GPU is active, give it a driver that only names a target: tracing a
    user Triton kernel (a `triton_op`) builds its TTIR to find which arguments it writes, and TTIR does not
    depend on the target (without this, every argument counts as written and Inductor copies each one)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if driver._active is not None or any(b.driver.is_active() for b in _triton_backends()):
        return
    target_only = types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32))
    stack.enter_context(mock.patch.object(driver, "_active", target_only))


def _triton_backends() -> list[Any]:
    from triton.backends import backends

    return list(backends.values())


def _fake_properties(device_type: str) -> types.SimpleNamespace:
    """Device properties of a stand-in device (an Intel Data Center GPU Max tile, an H100)."""
    if device_type == "xpu":
        return types.SimpleNamespace(
            name="dsv4_compile stand-in XPU (Data Center GPU Max tile)", type="gpu", platform_name="Intel(R) oneAPI",
            driver_version="0", total_memory=64 << 30, max_compute_units=512, gpu_eu_count=512,
            gpu_subslice_count=64, max_work_group_size=1024, max_num_sub_groups=64, sub_group_sizes=[16, 32],
            has_fp16=True, has_fp64=True, has_atomic64=True, has_bfloat16_conversions=True,
            has_subgroup_matrix_multiply_accumulate=True,
            has_subgroup_matrix_multiply_accumulate_tensor_float32=False, has_subgroup_2d_block_io=True,
        )
    return types.SimpleNamespace(
        name="dsv4_compile stand-in CUDA GPU (H100)", major=9, minor=0, multi_processor_count=132,
        total_memory=80 << 30, warp_size=32, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
        max_threads_per_block=1024, shared_memory_per_block_optin=232448, L2_cache_size=50 << 20,
        gcnArchName="", is_integrated=False,
    )
