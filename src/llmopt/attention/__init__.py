"""Attention backends behind one interface, chosen by name."""

from llmopt.attention.base import AttentionBackend, AttentionMetadata, get_backend, list_backends

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "list_backends"]
