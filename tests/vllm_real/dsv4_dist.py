"""vLLM's process groups for the DeepSeek-V4 harness at any tensor-parallel size (gloo on CPU).

vllm_layers.init_single_process_distributed (in tools) is the world-size-1 case; the same sequence for one rank of
several processes: vLLM's init_distributed_environment, initialize_model_parallel, then the workspace manager
(what the worker does next, gpu_worker.py:551)."""

from __future__ import annotations

import socket
from typing import Any

import torch


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a tcp:// rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def parallel_config(tensor_parallel_size: int) -> Any:
    """vLLM's ParallelConfig for `tensor_parallel_size` ranks, no pipeline or data parallelism, no expert
    parallelism (so the MoE experts are tensor-parallel: each rank holds a slice of every expert)."""
    from vllm.config import ParallelConfig

    return ParallelConfig(tensor_parallel_size=tensor_parallel_size)


def init_distributed(vllm_config: Any, world_size: int, rank: int, init_method: str) -> None:
    """This process as rank `rank` of a gloo world of `world_size` ranks, all of them one tensor-parallel group.
    Every rank calls it with the same `init_method` (e.g. tcp://127.0.0.1:PORT); it returns once all joined."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.v1.worker.workspace import init_workspace_manager

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=init_method)
        initialize_model_parallel(world_size, 1)
        init_workspace_manager(torch.device("cpu"))
