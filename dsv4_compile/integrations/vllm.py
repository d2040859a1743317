"""vLLM integration: the backend spellings of modes 1/2, and an Inductor post-grad pass for mode 3.

Modes 1/2, `CompilationConfig(mode=1 or 2, backend=...)`: vLLM hands `backend` to torch.compile as is when
the name is in `torch._dynamo.list_backends(exclude_tags=())` (our `torch_dynamo_backends` entry point puts
"dsv4_xpu" there); any other string is imported as "module.attr" ("dsv4_compile.lowering.backend.dsv4_xpu").
Neither needs anything from this module; the names are here as constants.

Mode 3, vLLM's own piecewise backend: Inductor runs `post_grad_custom_post_pass(graph)` on the functional
ATen graph, after the Dynamo-level pipeline would have run. `Dsv4PostGradPass` runs the ATen-level rewrite of
dsv4_compile.lowering.post_grad there: registered ops through the same per-op code as the Dynamo-level
`lower_ops` pass, and PDL / Triton fallbacks for user Triton launches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import marshal
import sys
import time
import types
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

import dsv4_compile as _package
from dsv4_compile.lowering.passes.base import PassResult
from dsv4_compile.lowering.post_grad import lower_registered_ops, rewrite_triton_launches, selected_ops
from dsv4_compile.lowering.registry import LOWERINGS, TRITON_FALLBACKS

log = logging.getLogger("dsv4_compile")

BACKEND_NAME = "dsv4_xpu"
BACKEND_QUALNAME = "dsv4_compile.lowering.backend.dsv4_xpu"
POST_GRAD_PASS_QUALNAME = "dsv4_compile.integrations.vllm.dsv4_post_grad_pass"

# Modules whose code decides what the pass emits; their source is part of uuid().
_CODE_MODULES = (
    __name__, "dsv4_compile.lowering.post_grad", "dsv4_compile.lowering.passes.pdl",
    "dsv4_compile.lowering.passes.base", "dsv4_compile.lowering.passes.lower_ops", "dsv4_compile.lowering.registry",
)


@dataclasses.dataclass(frozen=True)
class PostGradOptions:
    """What the post-grad pass rewrites.

    ops:  "namespace::name" of the registered ops to lower; None = every op in LOWERINGS when the pass runs.
    pdl:  rewrite user Triton launches (PDL off on Triton targets, plain-torch fallback on CPU).
    """

    ops: tuple[str, ...] | None = None
    pdl: bool = True


class Dsv4PostGradPass(CustomGraphPass):
    """Inductor `post_grad_custom_post_pass`: registered CUDA-only ops and PDL launches -> native ATen.

    `uuid()` hashes the source of the code that decides the rewrite (this module, the pdl pass, the registry,
    the modules of the selected native lowerings and Triton fallbacks) and the options, so Inductor's FX graph
    cache misses when either changes. `last_result` holds the counts of the latest call.
    """

    def __init__(self, options: PostGradOptions | None = None, **overrides: Any) -> None:
        self.options = dataclasses.replace(options or PostGradOptions(), **overrides)
        self.last_result: dict[str, PassResult] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        lowered = lower_registered_ops(graph, self.options.ops)
        launches = rewrite_triton_launches(graph) if self.options.pdl else PassResult()
        graph.lint()
        self.last_result = {"registered_ops": lowered, "triton_launches": launches}
        log.info("dsv4 post-grad pass: registered ops %d matched / %d changed, Triton launches %d / %d (%.2f ms)",
                 lowered.matched, lowered.changed, launches.matched, launches.changed,
                 1e3 * (time.perf_counter() - start))

    def uuid(self) -> str:
        return post_grad_uuid(self.options)

    def is_applicable_for_range(self, compile_range: object) -> bool:
        """vLLM's pass manager asks every pass this; the rewrite does not depend on shapes."""
        return True

    def __repr__(self) -> str:
        return f"Dsv4PostGradPass({self.options})"


def post_grad_uuid(options: PostGradOptions) -> str:
    """sha256 of the rewrite code's source and the options (the registry is read when called)."""
    digest = hashlib.sha256()
    for name in _CODE_MODULES:
        digest.update(_source_bytes(sys.modules[name]))
    for qualname in sorted(selected_ops(options.ops)):
        digest.update(qualname.encode())
        digest.update(_source_bytes(LOWERINGS[qualname].native))
    if options.pdl:
        for name in sorted(TRITON_FALLBACKS):
            digest.update(name.encode())
            digest.update(_source_bytes(TRITON_FALLBACKS[name]))
    digest.update(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())
    return digest.hexdigest()


def _source_bytes(obj: object) -> bytes:
    """Source of a module, or of the module defining a function (its helpers live there too)."""
    module = obj if isinstance(obj, types.ModuleType) else inspect.getmodule(obj)
    try:
        return inspect.getsource(module).encode()
    except (OSError, TypeError):
        code = getattr(obj, "__code__", None)
        return marshal.dumps(code) if code is not None else repr(obj).encode()


# --- vLLM -----------------------------------------------------------------------------------------------

# Where vLLM defines InductorPass (>= 0.11 and older releases).
_VLLM_INDUCTOR_PASS_MODULES = ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass")


def register_with_vllm(*, import_vllm: bool = True) -> bool:
    """Make `Dsv4PostGradPass` a virtual subclass of vLLM's `InductorPass`; returns whether it did.

    vLLM wraps any `inductor_passes` value that is not an InductorPass in `CallableInductorPass`, whose uuid
    hashes only the wrapped object's class source: our options and the rewrite modules would then not reach
    the cache key. Registered, vLLM takes the pass as is and keys on `uuid()`. Runs at import when vLLM is
    already loaded (never imports it then: importing vLLM patches torch); call it after importing vLLM otherwise.
    """
    for name in _VLLM_INDUCTOR_PASS_MODULES:
        module = sys.modules.get(name)
        if module is None and import_vllm:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                continue
        base = getattr(module, "InductorPass", None)
        if isinstance(base, type) and hasattr(base, "register"):
            base.register(Dsv4PostGradPass)
            return True
    return False


register_with_vllm(import_vllm=False)

# The instance `POST_GRAD_PASS_QUALNAME` names.
dsv4_post_grad_pass = Dsv4PostGradPass()

# vLLM resolves an `inductor_passes` string "a.b.c.name" as `__import__("a.b.c").__dict__["name"]`: the import
# runs this module, but `__import__` returns the top-level package, where the name is looked up. Publish the
# instance there too (here rather than in dsv4_compile/__init__.py: importing this module imports Inductor).
_package.dsv4_post_grad_pass = dsv4_post_grad_pass
