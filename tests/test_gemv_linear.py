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


def test_swapped_projections_fuse_into_one_swapped_module() -> None:
    """--dense-gemv then --fuse-projections: q/k/v and gate/up of swapped modules join into one
    GemvLinear each (so the fused matmul still takes the one-row kernel on a GPU), and the
    model's logits are those of the unfused swapped model."""
    from llmopt.models.fusion import fuse_projections

    cfg = preset_config("tiny").replace(qkv_bias=True)
    model = random_model(cfg, torch.device("cpu"), torch.bfloat16, seed=4)
    use_gemv_linears(model)
    ids = torch.randint(3, 512, (1, 9))
    with torch.no_grad():
        ref = model(ids).float()
        assert fuse_projections(model) == 2 * cfg.num_layers
        got = model(ids).float()
    layer = model.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is GemvLinear and type(layer.mlp.gate_up_proj) is GemvLinear
    assert layer.self_attn.qkv_proj.bias is not None
    assert (got - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_out_swap_takes_only_the_output_projections() -> None:
    """--dense-gemv out: o_proj and down_proj of every layer, nothing else (q/k/v, gate/up and the
    head stay plain, so the compiler keeps folding the norms into them); outputs unchanged; an
    unknown choice is refused."""
    import pytest

    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.bfloat16, seed=5)
    ids = torch.randint(3, 512, (1, 7))
    with torch.no_grad():
        before = model(ids).float()
    layers = model.model.layers
    assert use_gemv_linears(model, "out") == 2 * len(layers)
    swapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, GemvLinear)}
    assert swapped == {"o_proj", "down_proj"}
    assert type(layers[0].self_attn.q_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(ids).float(), before)
    with pytest.raises(ValueError, match="which"):
        use_gemv_linears(model, "qkv")


def test_default_swap_follows_the_device_and_the_model(monkeypatch) -> None:
    """An unset --dense-gemv: o_proj and down_proj on a GPU of compute capability 9.0 or later
    when they are plain half-precision linears; nothing on CPU, older GPUs, float32 or quantised
    models. (The rule reads module types and the capability only: a CPU model stands in.)"""
    from llmopt.models.gemv_linear import gemv_by_default
    from llmopt.quant import quantize_

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = random_model(preset_config("tiny"), cpu, torch.bfloat16, seed=5)
    f32 = random_model(preset_config("tiny"), cpu, torch.float32, seed=5)
    int8 = quantize_(random_model(preset_config("tiny"), cpu, torch.bfloat16, seed=5), "int8")
    assert gemv_by_default(bf16, cpu) == "none"
    for cap, want in (((8, 0), "none"), ((10, 0), "out"), ((9, 0), "out")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert gemv_by_default(bf16, cuda) == want, cap
    monkeypatch.setattr(torch.version, "hip", "6.2")  # a ROCm build: its "9.x" is not Hopper
    assert gemv_by_default(bf16, cuda) == "none"
    monkeypatch.setattr(torch.version, "hip", None)
    assert gemv_by_default(f32, cuda) == "none"
    assert gemv_by_default(int8, cuda) == "none"
    use_gemv_linears(bf16, "out")
    assert gemv_by_default(bf16, cuda) == "out"  # already swapped: still the choice


def test_generator_swaps_what_it_is_asked_and_pdl_follows(monkeypatch) -> None:
    """Generator(dense_gemv=...): "out" and "all" swap (eager too), "none" and an eager default
    swap nothing, a bad choice is a UserError; a model with swapped linears and no quantised ones
    takes llmopt's PDL launches under LLMOPT_KERNEL_PDL=auto (so inductor's stay on)."""
    import pytest

    from llmopt.engine.compile import _row_major_one_row_formats, use_pdl
    from llmopt.engine.generate import Generator
    from llmopt.errors import UserError

    cpu = torch.device("cpu")

    def bf16():
        return random_model(preset_config("tiny"), cpu, torch.bfloat16, seed=5)

    m = bf16()
    assert Generator(m, None, cpu).dense_gemv_modules == 0
    assert not _row_major_one_row_formats(m)
    g = Generator(m, None, cpu, dense_gemv="out")
    assert (g.dense_gemv, g.dense_gemv_modules) == ("out", 2 * len(m.model.layers))
    assert Generator(m, None, cpu).dense_gemv_modules == 2 * len(m.model.layers)  # counts what is there
    assert _row_major_one_row_formats(m)
    monkeypatch.delenv("LLMOPT_PDL", raising=False)
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "1")
    assert use_pdl(m)
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "0")
    assert not use_pdl(m)  # opaque kernels that are not PDL launches: inductor's off too
    all_swapped = bf16()
    n_plain = sum(type(x) is nn.Linear for x in all_swapped.modules())
    assert Generator(all_swapped, None, cpu, dense_gemv="all").dense_gemv_modules == n_plain
    assert Generator(bf16(), None, cpu, dense_gemv="none").dense_gemv_modules == 0
    with pytest.raises(UserError, match="dense_gemv"):
        Generator(bf16(), None, cpu, dense_gemv="qkv")
    import llmopt.models.gemv_linear as gl

    monkeypatch.setattr(gl, "DENSE_GEMV", "out")  # LLMOPT_DENSE_GEMV=out: what an unset choice takes
    assert Generator(bf16(), None, cpu).dense_gemv_modules == 2 * len(m.model.layers)
    assert Generator(bf16(), None, cpu, dense_gemv="none").dense_gemv_modules == 0  # the argument wins


def test_swap_keeps_the_module_and_its_hooks() -> None:
    """The swap changes each module's class in place: the same object, its forward hooks (a
    tensor-parallel row shard's all-reduce is one) still run, and a second swap finds nothing."""
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.bfloat16, seed=6)
    o = model.model.layers[0].self_attn.o_proj
    o.register_forward_hook(lambda mod, args, out: out + 1.0)
    x = torch.randn(1, 3, o.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        before = o(x)
        assert torch.equal(before, torch.nn.functional.linear(x, o.weight) + 1.0)
        assert use_gemv_linears(model, "out") == 2 * len(model.model.layers)
        assert model.model.layers[0].self_attn.o_proj is o and type(o) is GemvLinear
        assert torch.equal(o(x), before)
    assert use_gemv_linears(model, "out") == 0
