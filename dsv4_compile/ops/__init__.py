"""Custom ops of the CUDA-oriented code, defined from Python when no C++ library provides them."""

from dsv4_compile.ops.activation import silu_and_mul_with_clamp_native

__all__ = ["silu_and_mul_with_clamp_native"]
