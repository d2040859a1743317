"""Tooling around the rewrite: per-pass diffs, code generation without the hardware, CLI, demo."""
