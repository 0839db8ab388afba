"""Our model against Hugging Face transformers on tiny random configs of each architecture."""

from __future__ import annotations

import json

import pytest
import torch

from llmopt.config import ModelConfig
from llmopt.loading.loader import load_model
from tests.helpers import TINY_VARIANTS, save_hf_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_logits_match_transformers(variant: str, tmp_path) -> None:
    hf = save_hf_model(variant, tmp_path)
    ours = load_model(str(tmp_path), device="cpu", dtype="float32", progress=False)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.model(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    # The config read back must describe the same model.
    cfg = ours.config
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.tie_word_embeddings == bool(hf.config.tie_word_embeddings)


def test_rope_keys_both_generations(tmp_path) -> None:
    """transformers 5.x writes rope_parameters; 4.x wrote rope_theta/rope_scaling. Read both."""
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling.rope_type == "llama3"
    # And what we write reads back the same.
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(v4.to_hf_dict()))) == v4
