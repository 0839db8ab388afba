"""Decoding with the static KV cache equals full forward passes; batched equals one by one."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.generate import Generator
from llmopt.errors import UserError
from llmopt.loading.loader import load_model, random_model
from llmopt.loading.presets import preset_config
from llmopt.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    cfg = preset_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=3)
    # Sharpen the head so greedy choices are far from ties.
    model.lm_head.weight.mul_(40.0)
    return model


def _greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    model.clear_caches()
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_decode_equals_full_forward(tiny) -> None:
    prompt = [5, 17, 99, 3, 250, 41]
    ref = _greedy_no_cache(tiny, prompt, 24)
    gen = Generator(tiny, None, torch.device("cpu"))
    out = gen.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert out.finish_reason == "length"


def test_cached_logits_equal_full_forward_logits(tiny) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, 30))
    tiny.clear_caches()
    with torch.no_grad():
        full = tiny(ids)[0]
        tiny.setup_caches(1, 64)
        first = tiny(ids[:, :20], torch.arange(20)[None], kv_len=20)[0]
        steps = [tiny(ids[:, t:t + 1], torch.tensor([[t]]), kv_len=t + 1)[0, 0] for t in range(20, 30)]
    got = torch.cat([first, torch.stack(steps)])
    assert (got - full).abs().max().item() < 1e-4
    tiny.clear_caches()


def test_batched_equals_one_by_one(tiny) -> None:
    prompts = [[7, 8, 9], [100, 200, 300, 400, 500, 11, 12], [42], [3, 1, 4, 1, 5]]
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    gen = Generator(tiny, None, torch.device("cpu"))
    batched = gen.generate(prompts, params)
    single = [gen.generate([p], params)[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]


def test_sampling_is_seeded(tiny) -> None:
    gen = Generator(tiny, None, torch.device("cpu"))
    params = SamplingParams(max_new_tokens=12, temperature=5.0, top_k=50, top_p=0.95, seed=123,
                            ignore_eos=True)
    a = gen.generate([[1, 2, 3]], params)[0].token_ids
    b = gen.generate([[1, 2, 3]], params)[0].token_ids
    c = gen.generate([[1, 2, 3]], SamplingParams(**{**params.__dict__, "seed": 124}))[0].token_ids
    assert a == b
    assert a != c


def test_eos_and_max_tokens(tiny) -> None:
    gen = Generator(tiny, None, torch.device("cpu"))
    free = gen.generate([[9, 9]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    eos_tok = free.token_ids[3]
    first_eos = free.token_ids.index(eos_tok)
    gen.config = tiny.config.replace(eos_token_ids=(eos_tok,))
    out = gen.generate([[9, 9]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:first_eos]


def test_prompt_longer_than_context(tiny) -> None:
    gen = Generator(tiny, None, torch.device("cpu"))
    with pytest.raises(UserError, match="longer than the model's context"):
        gen.generate([[1] * 2000], SamplingParams(max_new_tokens=4))


def test_default_model_batched_and_stop_strings(default_model_dir: str) -> None:
    lm = load_model(default_model_dir, device="cpu", progress=False)
    gen = Generator(lm.model, lm.tokenizer, torch.device("cpu"))
    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    ids = [lm.tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    batched = gen.generate(ids, params)
    single = [gen.generate([i], params)[0] for i in ids]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    # A stop string cuts the text before it and ends the request; streamed text matches.
    full = single[0].text
    stop = full.strip().split()[1]
    chunks: list[str] = []
    out = gen.generate([ids[0]], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                stop=(stop,)), stream=lambda i, d: chunks.append(d))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert "".join(chunks) == out.text


def test_fused_projections_match_unfused() -> None:
    from llmopt.models.fusion import fuse_projections

    cfg = preset_config("tiny").replace(qkv_bias=True)
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=11)
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        ref = model(ids)
        assert fuse_projections(model) == 2 * cfg.num_layers
        got = model(ids)
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec", ["int8", "int8-g32", "int4-g32", "nf4", "fp8"])
def test_fused_quantised_projections_match_unfused(spec: str) -> None:
    """Weight-only quantised q/k/v and gate/up join into one module each (codes, scales and
    zeros concatenated; the same kernels on the same codes): the logits match the unfused
    quantised model, at one row (decode kernels) and at many (prefill)."""
    from llmopt.models.fusion import fuse_projections
    from llmopt.quant import quantize_

    cfg = preset_config("tiny").replace(qkv_bias=True)
    model = quantize_(random_model(cfg, torch.device("cpu"), torch.float32, seed=11), spec)
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        ref, ref1 = model(ids), model(ids[:1, :1])
        assert fuse_projections(model) == 2 * cfg.num_layers
        got, got1 = model(ids), model(ids[:1, :1])
    attn = model.model.layers[0].self_attn
    assert type(attn.qkv_proj).__name__.endswith("Linear") and attn.qkv_proj is not None
    assert not hasattr(attn, "q_proj") and attn.qkv_proj.out_features == cfg.hidden_size + 2 * cfg.num_kv_heads * cfg.head_dim
    for a, b in ((got, ref), (got1, ref1)):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_projections_fused_by_default_only_for_quantised_models_on_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--fuse-projections unset: a compiled weight-only quantised model is fused on a GPU (measured
    faster in every format); bf16 is not (measured slower), nor anything on CPU or under tensor
    parallelism. The decision reads the modules and the device only."""
    from llmopt.engine import compile as compile_mod
    from llmopt.models.fusion import fuse_by_default, fuse_projections
    from llmopt.quant import quantize_

    cfg = preset_config("tiny")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = random_model(cfg, cpu, torch.float32, seed=3)
    quantised = quantize_(random_model(cfg, cpu, torch.float32, seed=3), "int8")
    assert fuse_by_default(quantised, cuda) and not fuse_by_default(plain, cuda)
    assert not fuse_by_default(quantised, cpu)
    fuse_projections(quantised)  # already fused: still a quantised model
    assert fuse_by_default(quantised, cuda)
    monkeypatch.setattr(compile_mod, "_sharded", lambda: True)
    assert not fuse_by_default(quantised, cuda)


def test_quantised_projections_that_cannot_join_stay_apart() -> None:
    """Double-quantised NF4 (absmax blocks across output features) and mixed formats are left
    unfused, and the model still computes the same logits."""
    from llmopt.models.fusion import fuse_projections
    from llmopt.quant import quantize_
    from llmopt.quant.nf4 import NF4Config

    cfg = preset_config("tiny")
    model = quantize_(random_model(cfg, torch.device("cpu"), torch.float32, seed=5),
                      NF4Config(double_quant=True))
    mixed = quantize_(random_model(cfg, torch.device("cpu"), torch.float32, seed=5), "int8")
    for layer in mixed.model.layers:  # k in bf16, q and v int8: q/k/v stay apart
        layer.self_attn.k_proj = torch.nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        ref, ref_mixed = model(ids), mixed(ids)
        assert fuse_projections(model) == 0
        assert fuse_projections(mixed) == cfg.num_layers  # gate/up only
        assert torch.equal(model(ids), ref)
        assert (mixed(ids) - ref_mixed).abs().max().item() <= 1e-5 * ref_mixed.abs().max().item()
    assert mixed.model.layers[0].self_attn.qkv_proj is None


def test_compiled_cpu_decode_equals_eager(tiny, tmp_path, monkeypatch) -> None:
    """--compile on CPU (inductor with frozen, prepacked weights) decodes the same tokens as
    the eager path, batched and with prompts of different lengths."""
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    prompts = [[5, 17, 99, 3, 250, 41], [7, 8]]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    eager = Generator(tiny, None, torch.device("cpu")).generate(prompts, params)
    compiled = Generator(tiny, None, torch.device("cpu"), compile=True, max_seq_len=64).generate(prompts, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


def test_regional_compile_cpu_decode_equals_eager(tmp_path, monkeypatch) -> None:
    """--compile-mode regional on CPU: each layer compiled, one compiled graph for all of them
    (dynamo reuses it), the same tokens as eager."""
    import torch._dynamo

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=3)
    model.lm_head.weight.mul_(40.0)
    assert model.config.num_layers > 1
    prompts = [[5, 17, 99, 3, 250, 41], [7, 8]]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    eager = Generator(model, None, torch.device("cpu")).generate(prompts, params)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = Generator(model, None, torch.device("cpu"), compile=True, compile_mode="regional", max_seq_len=64)
    got = gen.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    # a new prompt length: prefill runs eager, outside the compiled layers, so nothing recompiles
    longer = [list(range(3, 40)), [9, 9, 9]]
    assert [o.token_ids for o in gen.generate(longer, params)] == [
        o.token_ids for o in Generator(model, None, torch.device("cpu")).generate(longer, params)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert model.model.layers[0]._compiled_call_impl is None  # compiled only inside the step


def test_pdl_setting_follows_the_model_and_the_environment(monkeypatch) -> None:
    """LLMOPT_PDL ``auto`` turns programmatic dependent launch on for a model whose linears are
    all inductor's to generate, off once weight-only quantised linears (kernels inductor does
    not generate) are in it; "1"/"0" force it; a bad value is a UserError naming the setting.
    Per-compile options keep what the compile mode sets."""
    import torch._inductor.config as inductor_config

    from llmopt.engine.compile import inductor_options, use_pdl
    from llmopt.quant import quantize_

    monkeypatch.delenv("LLMOPT_PDL", raising=False)
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=3)
    assert use_pdl(model)
    quantize_(model, "int8")
    assert not use_pdl(model)
    monkeypatch.setenv("LLMOPT_PDL", "1")
    assert use_pdl(model)
    monkeypatch.setenv("LLMOPT_PDL", "0")
    assert not use_pdl(random_model(preset_config("tiny"), torch.device("cpu"), torch.float32))
    opts = inductor_options(model, "reduce-overhead")
    assert opts["triton.cudagraphs"] is True
    if hasattr(inductor_config.triton, "enable_pdl"):
        assert opts["triton.enable_pdl"] is False
    monkeypatch.setenv("LLMOPT_PDL", "bogus")
    with pytest.raises(UserError, match="LLMOPT_PDL"):
        use_pdl(model)


def test_kernel_pdl_follows_the_formats_the_device_and_the_environment(monkeypatch) -> None:
    """LLMOPT_KERNEL_PDL ``auto``: llmopt's kernels run as PDL launches only for models whose
    quantised linears are all int8 per channel or weight-only fp8, and only on a GPU (so never
    for this CPU model); "1"/"0" force it; a model's compiled layers run with the flag the
    kernels read set to their model's choice, and put the eager value back after; a bad value
    is a UserError."""
    import llmopt.kernels
    from llmopt.engine.compile import CompiledLayers, _row_major_one_row_formats, kernel_pdl
    from llmopt.quant import quantize_

    def tiny(spec: str | None):
        model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=3)
        return quantize_(model, spec) if spec else model

    expected = {None: False, "int8": True, "fp8": True, "int8-g32": False, "int4-g32": False, "nf4": False}
    for spec, want in expected.items():
        assert _row_major_one_row_formats(tiny(spec)) is want, spec
    mixed = tiny(None)
    quantize_(mixed.model.layers[0], "int8")
    quantize_(mixed.model.layers[1], "nf4")
    assert not _row_major_one_row_formats(mixed)
    monkeypatch.setattr(llmopt.kernels, "KERNEL_PDL", llmopt.kernels.KERNEL_PDL)  # restored after
    monkeypatch.delenv("LLMOPT_KERNEL_PDL", raising=False)
    model = tiny("int8")
    assert not kernel_pdl(model)  # auto, on a CPU
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "1")
    assert kernel_pdl(model) and kernel_pdl(tiny("nf4"))
    forced = CompiledLayers(model)
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "0")
    off = CompiledLayers(tiny("int8"))
    for layers, want in ((forced, True), (off, False), (forced, True)):
        llmopt.kernels.KERNEL_PDL = None  # the eager value, whatever it is
        with layers.active():
            assert llmopt.kernels.KERNEL_PDL is want
        assert llmopt.kernels.KERNEL_PDL is None
    # whole-function compiles too, and dynamo traces each with its own model's value
    import torch._dynamo as dynamo

    from llmopt.engine.compile import compile_fn

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + (1.0 if llmopt.kernels.KERNEL_PDL else 2.0)

    dynamo.reset()
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "1")
    on_fn = compile_fn(probe, "default", model=model)
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "0")
    off_fn = compile_fn(probe, "default", model=model)
    llmopt.kernels.KERNEL_PDL = False
    for fn, want in ((on_fn, 1.0), (off_fn, 2.0), (on_fn, 1.0)):
        assert fn(torch.zeros(2)).tolist() == [want, want]
        assert llmopt.kernels.KERNEL_PDL is False
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "sometimes")
    with pytest.raises(UserError, match="LLMOPT_KERNEL_PDL"):
        kernel_pdl(model)


def test_tensor_parallel_ranks_on_gpus_pick_kernels_without_timing(monkeypatch) -> None:
    """Under tensor parallelism on GPUs (LLMOPT_TP_TUNING ``heuristic``, the default) each
    compile runs in inductor's deterministic mode, so every rank picks the same kernel configs;
    one process, or ``timed``, keeps the timed search; a bad value is a UserError."""
    import torch._inductor.config as inductor_config

    from llmopt.engine import compile as compile_mod

    if not hasattr(inductor_config, "deterministic"):
        pytest.skip("this torch has no deterministic inductor mode")
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=3)
    monkeypatch.delenv("LLMOPT_TP_TUNING", raising=False)
    with inductor_config.patch(deterministic=False):
        assert "deterministic" not in compile_mod.inductor_options(model, "reduce-overhead")
        monkeypatch.setattr(compile_mod, "_tp_on_gpus", lambda: True)
        monkeypatch.setenv("LLMOPT_TP_TUNING", "timed")
        assert "deterministic" not in compile_mod.inductor_options(model)
        assert not inductor_config.deterministic
        monkeypatch.delenv("LLMOPT_TP_TUNING")
        opts = compile_mod.inductor_options(model, "reduce-overhead")
        assert opts["deterministic"] is True and opts["triton.cudagraphs"] is True
        assert inductor_config.deterministic  # for first-launch tuning outside the compile too
        assert compile_mod.inductor_settings(model)["same_kernels_on_every_rank"]
        monkeypatch.setenv("LLMOPT_TP_TUNING", "bogus")
        with pytest.raises(UserError, match="LLMOPT_TP_TUNING"):
            compile_mod.inductor_options(model)


def test_pdl_setting_reaches_each_compile(tmp_path, monkeypatch) -> None:
    """The per-model setting is a per-compile option: inside inductor's compile of each model's
    layer, ``triton.enable_pdl`` reads what ``use_pdl`` chose for that model, unquantised and
    quantised alike in one process (CPU codegen ignores it; the GPU codegen reads the same
    config)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch has no triton.enable_pdl")
    seen: list[bool] = []

    class Probe(CustomGraphPass):
        def __call__(self, graph) -> None:
            seen.append(inductor_config.triton.enable_pdl)

        def uuid(self) -> None:
            return None  # no caching of graphs compiled with it

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMOPT_PDL", raising=False)
    before = inductor_config.triton.enable_pdl
    with inductor_config.patch(post_grad_custom_post_pass=Probe()):
        _compile_each(seen, before)


def _compile_each(seen: list[bool], before: bool) -> None:
    """Compile one layer of an unquantised, then an int8, tiny model; ``seen`` gets each compile's PDL."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from llmopt.engine.compile import CompiledLayers
    from llmopt.quant import quantize_

    for quant, expected in ((None, True), ("int8", False)):
        torch._dynamo.reset()
        model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=1)
        if quant:
            quantize_(model, quant)
        model.setup_caches(1, 64)
        with torch.no_grad():
            CompiledLayers(model).wrap(model)(torch.tensor([[1, 2, 3]]))
        assert seen and set(seen) == {expected}, (quant, seen)
        seen.clear()
        assert inductor_config.triton.enable_pdl == before  # an option of that compile only
