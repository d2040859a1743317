"""One graph per decode step: vLLM's NVIDIA decoder layers (the tiny config's three kinds chained: window with hash
routing, ratio 4 with the indexer, ratio 128) compiled by dsv4_xpu under cuda_compat("cpu"), with the graphs they
run counted by a backend that wraps dsv4_xpu. After warm-up (batches of 1, 2 and 3 requests: a batch of one keeps
its own graph, as every size of 0 or 1 does, and Dynamo makes the batch dimension dynamic at its second size), a
decode step of any batch size at any position runs one compiled graph, breaks nothing and compiles nothing.

Decodes read the caches as they are (zeros: no prefill wrote them), which does not change what is traced.
"""

from __future__ import annotations

import pytest
import torch

import dsv4_compile
from dsv4_compile.tools import vllm_layers as harness
from dsv4_compile.tools import vllm_steps as steps


@pytest.fixture(scope="module")
def stack():
    vllm_config, layers, _ = harness.tiny_stack(harness.build_nvidia_layers)
    return vllm_config, layers, steps.allocate_kv_caches(vllm_config, max_tokens=512, num_sequences=4)


def test_decode_steps_run_one_graph_at_any_batch_size_and_position(stack):
    from torch._dynamo.utils import counters

    vllm_config, layers, setup = stack
    torch._dynamo.reset()
    counter = steps.GraphCounter()
    compiled = torch.compile(lambda x, p, i: harness.run_layers(layers, x, p, i), backend=counter)
    sequences = [steps.new_sequence(setup, index) for index in range(4)]
    for sequence, cached in zip(sequences, [5, 130, 200, 300], strict=True):
        sequence.num_computed = cached  # past the window, the ratio-128 entry and the indexer's top-k size

    def decode(batch_size: int) -> tuple[int, int, int]:
        batch = [(sequence, 1) for sequence in sequences[:batch_size]]
        token_ids = torch.tensor([(7 * s.num_computed) % 256 for s, _ in batch])
        stream = harness.residual_stream(token_ids, 256, 4)
        before = counter.compiled, counter.calls, sum(counters["graph_break"].values())
        with dsv4_compile.cuda_compat("cpu"), steps.batch_step(vllm_config, setup, batch) as positions:
            out = compiled(stream, positions, token_ids)
        assert out.shape == (batch_size, 4, 256) and torch.isfinite(out).all()
        return (counter.compiled - before[0], counter.calls - before[1],
                sum(counters["graph_break"].values()) - before[2])

    warm_up = [decode(size) for size in (1, 2, 3)]
    assert all(calls == 1 and breaks == 0 for _, calls, breaks in warm_up), warm_up
    # Every later step, each a position further on: no compile, one graph, no break.
    for size in (4, 2, 1, 3, 4, 1, 1, 2):
        assert decode(size) == (0, 1, 0), f"decode of {size} requests"
