"""Model implementations, chosen by the ``architectures`` entry of config.json."""

from llmopt.models.registry import build_model

__all__ = ["build_model"]
