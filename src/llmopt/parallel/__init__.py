"""Tensor parallelism: process groups and launch, sharding plans, sharded loading.

Imports stay light: ``torch.distributed`` machinery loads only when a submodule is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ShardedLLM", "init_tp", "load_sharded", "maybe_launch", "rank_index", "shard_model"]

if TYPE_CHECKING:
    from llmopt.parallel.launch import maybe_launch
    from llmopt.parallel.llm import ShardedLLM
    from llmopt.parallel.loading import load_sharded
    from llmopt.parallel.process_group import init_tp, rank_index
    from llmopt.parallel.sharding import shard_model

_WHERE = {
    "ShardedLLM": "llmopt.parallel.llm",
    "init_tp": "llmopt.parallel.process_group",
    "rank_index": "llmopt.parallel.process_group",
    "load_sharded": "llmopt.parallel.loading",
    "maybe_launch": "llmopt.parallel.launch",
    "shard_model": "llmopt.parallel.sharding",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'llmopt.parallel' has no attribute {name!r}")
