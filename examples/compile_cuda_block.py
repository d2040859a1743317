"""Compile a CUDA-written MLP for the local device with the dsv4_xpu backend and show what changed.

    python examples/compile_cuda_block.py [cpu|xpu|cuda]

The module is written the way CUDA code is: an aux stream overlapping a side computation, the fused
`_C.silu_and_mul_with_clamp` out-parameter kernel, a `device="cuda"` constant. No `is_xpu()` anywhere.
"""

import sys

import torch

import dsv4_compile


class SwigluMlp(torch.nn.Module):
    def __init__(self, hidden: int = 256, intermediate: int = 512, limit: float = 10.0) -> None:
        super().__init__()
        self.limit = limit
        self.up = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)
        self.side_stream = torch.cuda.Stream()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            norm = x.pow(2).mean(-1, keepdim=True)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        h = self.up(x)
        act = torch.empty(*h.shape[:-1], h.shape[-1] // 2, dtype=h.dtype, device=h.device)
        torch.ops._C.silu_and_mul_with_clamp(act, h, self.limit)
        position = torch.arange(x.shape[-1], device="cuda", dtype=x.dtype)
        return self.down(act) + norm * position / x.shape[-1]


def reference(mlp: SwigluMlp, x: torch.Tensor) -> torch.Tensor:
    h = mlp.up(x)
    gate, up = h.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate.clamp(max=mlp.limit)) * up.clamp(-mlp.limit, mlp.limit)
    position = torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)
    return mlp.down(act) + x.pow(2).mean(-1, keepdim=True) * position / x.shape[-1]


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    with dsv4_compile.cuda_compat(device):  # torch.cuda.Stream() in __init__ needs it off CUDA
        mlp = SwigluMlp().to(device)
    x = torch.randn(16, 256, device=device)
    compiled = dsv4_compile.compile(mlp, device=device)
    with torch.no_grad():
        out = compiled(x)
        expected = reference(mlp, x)
    print(dsv4_compile.last_report())
    print("max |compiled - plain torch|:", (out - expected).abs().max().item())
