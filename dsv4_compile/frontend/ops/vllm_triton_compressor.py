"""Plain-torch stand-ins for vLLM's Triton entry points, for targets without Triton (CPU)."""

from __future__ import annotations

from collections.abc import Callable

NO_TRITON_SUBSTITUTES: dict[str, Callable[..., object]] = {}
