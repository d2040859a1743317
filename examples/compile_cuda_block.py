"""Compile a CUDA-oriented block for the local device with the dsv4_xpu backend and show what changed.

    python examples/compile_cuda_block.py [cpu|xpu|cuda]
"""

import sys

import torch

import dsv4_compile
from dsv4_compile.demo import CudaOrientedBlock, local_device, native_block

device = sys.argv[1] if len(sys.argv) > 1 else local_device()
with dsv4_compile.cuda_compat(device):  # the block builds torch.cuda.Stream()s in __init__
    block = CudaOrientedBlock().to(device)
x = torch.randn(16, 256, device=device)

compiled = torch.compile(block, backend="dsv4_xpu", options={"device": device})
with dsv4_compile.cuda_compat(device), torch.no_grad():
    out = compiled(x)
    expected = native_block(block, x)
print(dsv4_compile.last_report())
print("max error vs eager native:", (out - expected).abs().max().item())
