"""The attention-backend interface and its registry.

A backend prepares metadata once per forward pass (masks, lengths) and is then called by every
layer with queries and the keys/values to attend to. Model code never knows which backend runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from llmopt.errors import UserError


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [B, T] position of each query token
    key_positions: torch.Tensor  # [S] or [B, S] position of each key slot
    mask: torch.Tensor | None  # [B, 1, T, S] bool, True = attend
    kv_len: int | None  # keys beyond this slot are never read (None: all S)


class AttentionBackend(Protocol):
    name: str

    def prepare(
        self,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        kv_len: int | None,
        sliding_window: int | None,
    ) -> AttentionMetadata: ...

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[[], AttentionBackend]], Callable[[], AttentionBackend]]:
    def deco(factory: Callable[[], AttentionBackend]) -> Callable[[], AttentionBackend]:
        _REGISTRY[name] = factory
        return factory

    return deco


def list_backends() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def resolve_backend_name(name: str, device: torch.device) -> str:
    """``auto``: the split-K Triton decode kernel on CUDA, SDPA elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    return name


def get_backend(name: str) -> AttentionBackend:
    _import_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown attention backend {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _import_builtin() -> None:
    from llmopt.attention import sdpa, triton_decode  # noqa: F401
