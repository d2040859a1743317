"""Graph rewrites, one per module, and the residual-CUDA audit. The order lives in dsv4_compile.pipeline."""
