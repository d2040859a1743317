"""Integrations with serving stacks.

`dsv4_compile.integrations.vllm`: the Inductor post-grad pass for vLLM's own compilation mode
(`CompilationConfig(mode=3, inductor_passes={"post_grad_custom_post_pass": ...})`) and the config spellings
of modes 1/2. Nothing here imports vLLM; see docs/vllm.md.
"""
