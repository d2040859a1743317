"""vLLM's workspace manager, answered at trace time with plain allocations.

vLLM's NVIDIA attention takes its prefill scratch buffers from `current_workspace_manager().get_simultaneous(
(shape, dtype), ...)` (nvidia/flashmla.py:125 and :315): views, in several dtypes, into one growing uint8 buffer,
so that CUDA-graph captures see fixed addresses. Off CUDA nothing is captured, and the views cost twice over when
traced: a ContextVar read (workspace.py:124) and, with dynamic shapes, torch 2.13's AOTAutograd returning such a
dtype view of a graph input with the wrong shape when it leaves a graph (((3, 162, 256) where (3, 162, 512) was
asked; tests/test_workspace_views_upstream.py keeps the reproducer). The contract the callers rely on is "scratch
tensors of these shapes and dtypes, contents undefined", which `torch.empty` meets: inside the graph they are
ordinary allocations that Inductor plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ScratchWorkspace:
    """Stands in for vLLM's WorkspaceManager where scratch tensors are plain allocations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def get_simultaneous(self, *shapes_and_dtypes: tuple[Sequence[int], torch.dtype]) -> list[torch.Tensor]:
        return [torch.empty(tuple(shape), dtype=dtype, device=self.device) for shape, dtype in shapes_and_dtypes]


def current_workspace_manager() -> ScratchWorkspace:
    """vLLM's `current_workspace_manager()`, answering a ScratchWorkspace on the manager's device (CPU when
    vLLM's worker made none: its CPU worker never does)."""
    from vllm.v1.worker import workspace

    manager = workspace._manager
    return ScratchWorkspace(manager._device if manager is not None else torch.device("cpu"))
