"""Random-weight models of well-known shapes, for benchmarks (labelled "random weights")."""

from __future__ import annotations

from typing import Any

from llmopt.config import ModelConfig
from llmopt.errors import UserError

_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3-8b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
                   "rope_theta": 10000.0, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    # The default model's shape (SmolLM2-135M), for GPU measurements of what its size costs
    # (launch-bound steps) where its weights cannot travel.
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                     "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1,
                     "eos_token_id": 2},
    # Small shapes for CPU tests and smoke runs.
    "tiny": {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024,
             "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2},
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_hf_dict(PRESETS[name])
