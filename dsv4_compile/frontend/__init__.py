"""Before the graph exists: trace-time CUDA compatibility (`cuda_compat`), the CUDA-only op definitions
code needs to trace, capture with CUDA semantics, and the `compile()` convenience."""
