"""Graph passes, one per module, plus the residual-CUDA audit. The order lives in lowering/pipeline.py."""
