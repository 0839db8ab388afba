"""The --dense-gemv module swap: what it swaps, that parameters stay shared, and that the model
computes what it did (on CPU every input takes F.linear; the kernel itself is checked under
Triton's interpreter in test_quant_kernels.py and on the GPU in test_gpu_decode.py)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmopt.loading.loader import random_model
from llmopt.loading.presets import preset_config
from llmopt.models.gemv_linear import GemvLinear, use_gemv_linears


def test_swap_shares_parameters_and_keeps_outputs() -> None:
    cfg = dataclasses.replace(preset_config("tiny"), tie_word_embeddings=True)
    model = random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        before = model(ids).float()
    plain = sum(type(m) is nn.Linear for m in model.modules())
    weights = {id(m.weight) for m in model.modules() if type(m) is nn.Linear}
    assert use_gemv_linears(model) == plain > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert {id(m.weight) for m in model.modules() if isinstance(m, GemvLinear)} == weights
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        after = model(ids).float()
    assert torch.equal(before, after)


def test_swap_leaves_float32_and_non_linear_modules() -> None:
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=3)
    assert use_gemv_linears(model) == 0
