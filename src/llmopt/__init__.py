"""llmopt: fast LLM inference in pure PyTorch, with the quality cost of each optimisation measured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "load_model", "__version__"]

if TYPE_CHECKING:
    from llmopt.api import LLM
    from llmopt.loading.loader import load_model
    from llmopt.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import llmopt` stays cheap and never pulls in optional kernel libraries.
    if name == "LLM":
        from llmopt.api import LLM

        return LLM
    if name == "SamplingParams":
        from llmopt.sampling import SamplingParams

        return SamplingParams
    if name == "load_model":
        from llmopt.loading.loader import load_model

        return load_model
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
