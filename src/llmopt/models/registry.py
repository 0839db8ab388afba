from __future__ import annotations

from torch import nn

from llmopt.config import SUPPORTED_ARCHITECTURES, ModelConfig
from llmopt.errors import UserError


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model for ``config`` on the current default device (use ``meta`` to defer)."""
    if config.architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # Llama 2/3, Mistral, Qwen2 and SmolLM2 differ only in config fields (bias, tying, rope, window).
    from llmopt.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(config)
