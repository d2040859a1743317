"""The vLLM compilation configs that put dsv4_compile in vLLM's compile path (docs/vllm.md).

    python examples/vllm_config.py

Builds real `vllm.config.CompilationConfig`s where vLLM is importable; elsewhere prints the config dicts
(the same dicts work as `--compilation-config '<json>'` on `vllm serve`).
"""

from __future__ import annotations

import json

from dsv4_compile.integrations.vllm import (
    BACKEND_NAME,
    BACKEND_QUALNAME,
    POST_GRAD_PASS_QUALNAME,
    dsv4_post_grad_pass,
    register_with_vllm,
)

CONFIGS = {
    # Modes 1/2: torch.compile with our backend. By registered name (entry point, no import needed) ...
    "mode 1, registered name": {"mode": 1, "backend": BACKEND_NAME},
    # ... or by qualified name, which vLLM imports ("module.attr").
    "mode 2, qualified name": {"mode": 2, "backend": BACKEND_QUALNAME},
    # Mode 3: vLLM's piecewise backend + Inductor; our rewrite runs as Inductor's post-grad custom pass.
    "mode 3, post-grad pass by name": {
        "mode": 3, "backend": "inductor", "inductor_passes": {"post_grad_custom_post_pass": POST_GRAD_PASS_QUALNAME},
    },
}


def main() -> None:
    try:
        from vllm.config import CompilationConfig
    except Exception as exc:  # not installed, or its import needs a stack this machine lacks
        print(f"vllm not importable ({type(exc).__name__}); the CompilationConfig keyword arguments:")
        for title, config in CONFIGS.items():
            print(f"  {title}: {json.dumps(config)}")
        return
    register_with_vllm()  # vLLM then keys its caches on the pass's own uuid()
    for title, config in CONFIGS.items():
        print(f"{title}: {json.dumps(config)}")
        try:
            built = CompilationConfig(**config)
        except KeyError as exc:  # vLLM looks a dotted pass name up in the top-level package (docs/vllm.md)
            print(f"    not resolvable by this vLLM: {exc!r}")
            continue
        post_grad = built.inductor_compile_config.get("post_grad_custom_post_pass")
        print(f"    -> mode={built.mode!r} backend={built.backend!r} post_grad_custom_post_pass={post_grad!r}")
    # From Python, the pass object itself (inductor_passes takes strings only; needs register_with_vllm()).
    built = CompilationConfig(mode=3, backend="inductor",
                              inductor_compile_config={"post_grad_custom_post_pass": dsv4_post_grad_pass})
    print(f"mode 3, pass object: -> {built.inductor_compile_config['post_grad_custom_post_pass']!r}")

if __name__ == "__main__":
    main()
