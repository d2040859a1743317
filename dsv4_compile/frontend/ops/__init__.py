"""CUDA-only ops that CUDA-oriented code calls, defined from Python when no C++ library provides them
(schema, fake impl), so Dynamo can trace that code on any machine."""

from dsv4_compile.frontend.ops import activation

__all__ = ["activation"]
