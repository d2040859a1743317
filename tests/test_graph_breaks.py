"""With fullgraph=False and a graph break in the model, every subgraph goes through the rewrite."""

import torch

import dsv4_compile
from tests.blocks import CudaOrientedBlock, native_block
from tests.conftest import needs_trace_time_retarget, reports_since


class BrokenBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = CudaOrientedBlock(hidden=32, intermediate=64, seed=1)
        self.second = CudaOrientedBlock(hidden=32, intermediate=64, seed=2)

    def forward(self, x):
        y = self.first(x)
        print("host-side logging forces a graph break")
        return self.second(y)


@needs_trace_time_retarget
def test_every_subgraph_is_rewritten():
    with dsv4_compile.cuda_compat("cpu"):
        model = BrokenBlock()
    x = torch.randn(4, 32)
    seen = dsv4_compile.all_reports()
    out = dsv4_compile.compile(model, fullgraph=False)(x)
    reports = reports_since(seen)
    assert len(reports) >= 2, "the print should split the forward into two graphs"
    for report in reports:
        assert report["activation"].changed == 1
        assert report["aux_streams"].changed > 0
        assert report["audit"].matched == 0
    expected = native_block(model.second, native_block(model.first, x))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
