"""GPU paths of the latency engine: the split-K decode kernel and compiled decode (run on the device)."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.cuda_graph import CapturedStep
from llmopt.engine.generate import Generator
from llmopt.loading.loader import random_model
from llmopt.loading.presets import preset_config
from llmopt.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bsz, hq, hkv, d, max_len, window", [
    (1, 32, 32, 128, 300, 0),
    (3, 32, 8, 128, 4100, 0),
    (2, 9, 3, 64, 777, 0),
    (4, 8, 1, 128, 1000, 100),
    (8, 40, 40, 128, 64, 0),
])
def test_decode_kernel_matches_reference(bsz, hq, hkv, d, max_len, window) -> None:
    from llmopt.kernels.decode_attention import decode_attention, reference_decode_attention

    torch.manual_seed(bsz * 1000 + max_len)
    dev = torch.device("cuda")
    q = torch.randn(bsz, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(bsz, hkv, max_len, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(bsz, hkv, max_len, d, device=dev, dtype=torch.bfloat16)
    lengths = torch.randint(1, max_len + 1, (bsz,), device=dev)
    lengths[0] = max_len
    out = decode_attention(q, k, v, lengths, d ** -0.5, window)
    ref = reference_decode_attention(q, k, v, lengths, d ** -0.5, window)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert torch.isfinite(out).all()
    assert err < 1e-2
    # as programmatic dependent launches (LLMOPT_KERNEL_PDL): the same kernels, the same sums
    assert torch.equal(decode_attention(q, k, v, lengths, d ** -0.5, window, pdl=True), out)


def _tiny_cuda(dtype: torch.dtype) -> torch.nn.Module:
    model = random_model(preset_config("tiny"), torch.device("cuda"), dtype, seed=5)
    model.lm_head.weight.mul_(40.0)
    return model


def test_triton_backend_matches_sdpa_logits() -> None:
    model = _tiny_cuda(torch.float32)
    ids = torch.randint(3, 512, (2, 40), device="cuda")
    outs = {}
    for backend in ("sdpa", "triton"):
        model.set_attention_backend(backend)
        model.clear_caches()
        model.setup_caches(2, 128)
        with torch.no_grad():
            model(ids[:, :30], torch.arange(30, device="cuda").expand(2, 30), kv_len=30)
            steps = [model(ids[:, t:t + 1], torch.full((2, 1), t, device="cuda"))[:, 0]
                     for t in range(30, 40)]
        outs[backend] = torch.stack(steps)
    ref = outs["sdpa"]
    assert ((outs["triton"] - ref).norm() / ref.norm()).item() < 1e-4


def test_compiled_decode_equals_eager() -> None:
    model = _tiny_cuda(torch.float32)
    model.set_attention_backend("triton")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    eager = Generator(model, None, torch.device("cuda")).generate(prompts, params)
    model.clear_caches()
    compiled = Generator(model, None, torch.device("cuda"), compile=True, max_seq_len=256)
    got = compiled.generate(prompts, params)
    again = compiled.generate(prompts, params)  # replays the captured graph
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    assert [o.token_ids for o in again] == [o.token_ids for o in eager]


def test_regional_compile_captured_step_equals_eager() -> None:
    """--compile-mode regional: one compiled layer graph shared by every layer, the whole step
    captured as one CUDA graph; same tokens as eager, replayed without re-capture, re-captured
    when a larger batch reallocates the KV cache."""
    import torch._dynamo

    model = _tiny_cuda(torch.float32)
    model.set_attention_backend("triton")
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    eager = Generator(model, None, torch.device("cuda")).generate(prompts, params)
    eager3 = Generator(model, None, torch.device("cuda")).generate(prompts + [[3, 4]], params)
    model.clear_caches()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = Generator(model, None, torch.device("cuda"), compile=True, compile_mode="regional",
                    max_seq_len=256)
    got = gen.generate(prompts, params)
    again = gen.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    assert [o.token_ids for o in again] == [o.token_ids for o in eager]
    assert isinstance(gen._decode_graph, CapturedStep) and gen._decode_graph.captures == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # every layer, one graph
    got3 = gen.generate(prompts + [[3, 4]], params)
    assert [o.token_ids for o in got3] == [o.token_ids for o in eager3]
    assert gen._decode_graph.captures == 2


def test_regional_compiled_speculation_on_gpu() -> None:
    """Speculation with captured regional graphs (verify at widths 1 and k+1, the draft's step):
    greedy output equals plain decoding's, with k fixed and with adaptive k, whose plain steps
    run without a per-step sync between graph replays."""
    from llmopt.speculative import (
        AlwaysWrongDrafter,
        ReplayDrafter,
        SpeculativeConfig,
        SpeculativeGenerator,
        build_drafter,
    )

    model = _tiny_cuda(torch.float32)
    model.set_attention_backend("triton")
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    ref = Generator(model, None, torch.device("cuda")).generate([prompt], params)[0].token_ids
    for drafter in (build_drafter("self-layers:1", model, None), ReplayDrafter(ref[:20])):
        cfg = SpeculativeConfig(k=3, adaptive=False, compile=True, compile_mode="regional", max_seq_len=128)
        gen = SpeculativeGenerator(model, None, torch.device("cuda"), drafter, cfg)
        assert gen.generate([prompt], params)[0].token_ids == ref, drafter.name
        assert gen._verify_graph.captures >= 2  # one graph per verified width
    for drafter in (AlwaysWrongDrafter(ref, model.config.vocab_size), ReplayDrafter(ref[:20])):
        cfg = SpeculativeConfig(k=3, compile=True, compile_mode="regional", max_seq_len=128)
        gen = SpeculativeGenerator(model, None, torch.device("cuda"), drafter, cfg)
        for _ in range(2):  # the second run starts from the first's measured step costs
            out = gen.generate([prompt], params)[0]
            assert out.token_ids == ref, drafter.name
            stats = out.extra["speculative"]
            assert stats["step_costs"] == "measured" and stats["k_histogram"].get("0", 0) > 0


def test_distill_continuations_compiled_equal_eager(monkeypatch) -> None:
    """distill's on-policy data on a GPU comes from a compiled generator at full batch width
    (the last batch padded): the same greedy continuations as the eager generator."""
    from llmopt.speculative import distill as D

    model = _tiny_cuda(torch.float32)
    cfg = D.DistillConfig(num_layers=1, seq_len=16, on_policy=1.0, policy_prompt_len=8,
                          policy_new_tokens=12)
    monkeypatch.setattr(D, "policy_batch", lambda device: 4)
    stream = torch.randint(3, 512, (400,))
    dev = torch.device("cuda")
    eager = D.PolicySequences.generate(model, stream, cfg, 6, dev, seed=1)
    gen = Generator(model, None, dev, compile=True)
    compiled = D.PolicySequences.generate(model, stream, cfg, 6, dev, seed=1, generator=gen)
    assert compiled.seqs.shape == eager.seqs.shape == (6, 20)
    assert torch.equal(compiled.seqs, eager.seqs)


class _ByteTokenizer:
    """Enough of a tokenizer for distill(): one id per byte, no end-of-sequence ids, no files."""

    eos_token_ids: frozenset[int] = frozenset()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + b for b in text.encode()]

    def save(self, out_dir) -> None:
        pass


def test_distill_trains_on_the_gpu(tmp_path) -> None:
    """distill()'s CUDA loop (bf16 autocast, fused AdamW, pinned batches, losses read ten steps
    at a time): the KL to the teacher falls, and the losses read back (every tenth, the first and
    the last step's) are finite floats."""
    import math

    from llmopt.speculative import distill as D

    model = _tiny_cuda(torch.float32)
    text = " ".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog" for i in range(200))
    cfg = D.DistillConfig(num_layers=1, steps=25, batch_size=4, seq_len=32, lr=2e-3, warmup_steps=2,
                          checkpoint_every=0, eval_batches=2, on_policy=0.5, policy_prompts=8,
                          policy_prompt_len=8, policy_new_tokens=28, compile_teacher=False)
    summary = D.distill(model, _ByteTokenizer(), text, cfg, tmp_path / "s", torch.device("cuda"),
                        progress=False)
    assert summary["steps_run"] == 25
    assert summary["held_out_after"]["kl"] < summary["held_out_before"]["kl"]
    assert [h["step"] for h in summary["loss_every_10"]] == [10, 20]
    first, last = summary["loss_first"], summary["loss_last"]
    assert first["step"] == 1 and last["step"] == 25
    for rec in (first, last, *summary["loss_every_10"]):
        assert all(math.isfinite(rec[k]) for k in ("loss", "kl", "grad_norm"))


def test_dense_gemv_swap_matches_linear_and_decodes_the_same() -> None:
    """--dense-gemv: each swapped module at one row agrees with F.linear; batch-1 greedy decode,
    eager and regionally compiled, gives the tokens of the unswapped model."""
    from llmopt.models.gemv_linear import GemvLinear, use_gemv_linears

    model = _tiny_cuda(torch.bfloat16)
    prompt = [[5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    dev = torch.device("cuda")
    ref = Generator(model, None, dev).generate(prompt, params)[0].token_ids
    model.clear_caches()
    assert use_gemv_linears(model) > 0
    for m in model.modules():
        if isinstance(m, GemvLinear):
            x = torch.randn(1, 1, m.in_features, device="cuda", dtype=torch.bfloat16)
            want = torch.nn.functional.linear(x, m.weight, m.bias).float()
            err = ((m(x).float() - want).norm() / want.norm()).item()
            assert err < 1e-2, err
    assert Generator(model, None, dev).generate(prompt, params)[0].token_ids == ref
    model.clear_caches()
    gen = Generator(model, None, dev, compile=True, compile_mode="regional", max_seq_len=256)
    assert gen.generate(prompt, params)[0].token_ids == ref


def test_dense_gemv_out_by_default_decodes_the_same(monkeypatch) -> None:
    """An unset --dense-gemv on a Hopper GPU: a compiled bf16 model's o_proj and down_proj take the
    one-row kernel (down_proj's input, silu(gate) * up, then comes from the compiler's kernels into
    the opaque matmul), as prefetching (LLMOPT_GEMV_PREFETCH auto) PDL launches (LLMOPT_KERNEL_PDL
    auto) at the first run and at replays; batch-1 greedy decode keeps the unswapped model's
    tokens up to near ties; the eager model's quantised rows keep prefetch off."""
    import copy

    from tests.helpers import assert_greedy_up_to_ties

    import llmopt.kernels
    from llmopt.engine.compile import kernel_pdl
    from llmopt.models.gemv_linear import GemvLinear
    from llmopt.quant.kernels import triton_wo as T

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the default swap is for Hopper or later")
    for name in ("LLMOPT_KERNEL_PDL", "LLMOPT_GEMV_PREFETCH", "LLMOPT_DENSE_ONE_ROW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(llmopt.kernels, "KERNEL_PDL", False)  # auto's eager value
    monkeypatch.setattr(T, "GEMV_PREFETCH", None)  # auto
    calls: list[tuple[int, bool, bool]] = []
    inner = T._gemv1

    def spy(*args):  # runs at call time (the PDL op's body is opaque to dynamo)
        calls.append((args[5], args[-2], args[-1]))  # fmt, prefetch, pdl
        return inner(*args)

    monkeypatch.setattr(T, "_gemv1", spy)
    model = _tiny_cuda(torch.bfloat16)
    plain = copy.deepcopy(model)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    gen = Generator(model, None, torch.device("cuda"), compile=True, compile_mode="regional",
                    max_seq_len=256)
    assert (gen.dense_gemv, gen.dense_gemv_modules) == ("out", 2 * len(model.model.layers))
    layer = model.model.layers[0]
    assert type(layer.self_attn.o_proj) is GemvLinear and type(layer.mlp.down_proj) is GemvLinear
    assert type(layer.mlp.gate_proj) is torch.nn.Linear and kernel_pdl(model)
    for _ in range(2):  # the first run (compiles, captures) and a replay
        assert_greedy_up_to_ties(plain, [5, 6, 7, 8], gen.generate([[5, 6, 7, 8]], params)[0].token_ids)
    assert calls and set(calls) == {(T.FMT_DENSE, True, True)}
    calls.clear()
    w8 = torch.randint(-127, 128, (256, 512), device="cuda", dtype=torch.int8)
    s8 = torch.rand(256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    T.gemv(x, w8, s8, s8, s8, T.FMT_INT8, 1 << 30, one_row="deferred")
    assert calls == [(T.FMT_INT8, False, False)]


@pytest.mark.parametrize("spec", ["int8", "gptq-w8", "int4-g32", "nf4", "fp8"])
def test_fused_quantised_projections_decode_the_same(spec: str) -> None:
    """--fuse-projections on a quantised model on the GPU (the joined int4 module rebuilds its
    tinygemm copy): logits at one row match the unfused model, and compiled batch-1 greedy
    decode gives the unfused model's greedy tokens up to near ties (the joined matmul's kernel
    sums in another order: other tiles, another split of K)."""
    import copy

    from tests.helpers import assert_greedy_up_to_ties, sharp_int4_tiny

    model = sharp_int4_tiny("cuda", torch.bfloat16, spec)
    unfused = copy.deepcopy(model)
    dev = torch.device("cuda")
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    ids = torch.tensor([[5]], device=dev)
    with torch.no_grad():
        ref_logits = model(ids).float()
    gen = Generator(model, None, dev, compile=True, compile_mode="regional", max_seq_len=256,
                    fuse_projections=True)
    assert model.model.layers[0].self_attn.qkv_proj is not None
    assert unfused.model.layers[0].self_attn.qkv_proj is None
    if spec.startswith("int4"):
        assert model.model.layers[0].mlp.gate_up_proj.tg_weight is not None
    assert_greedy_up_to_ties(unfused, prompt, gen.generate([prompt], params)[0].token_ids)
    model.clear_caches()
    with torch.no_grad():
        got = model(ids).float()
    assert ((got - ref_logits).norm() / ref_logits.norm()).item() < 1e-2


def test_kernel_pdl_auto_on_a_gpu(monkeypatch) -> None:
    """LLMOPT_KERNEL_PDL unset (auto) on a Hopper GPU: an int8 model's compiled decode takes the
    one-row kernels' PDL op (and keeps the eager model's tokens up to near ties) while eager
    code keeps the setting's value (off); an NF4 model's rule says off."""
    import copy

    from tests.helpers import assert_greedy_up_to_ties, sharp_int4_tiny

    import llmopt.kernels
    from llmopt.engine.compile import kernel_pdl
    from llmopt.quant.kernels import triton_wo as T

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs Hopper or later")
    monkeypatch.delenv("LLMOPT_KERNEL_PDL", raising=False)
    monkeypatch.setattr(llmopt.kernels, "KERNEL_PDL", False)  # auto's eager value
    launched: list[bool] = []
    inner = T._gemv1

    def spy(*args):  # the PDL op's body runs at call time, opaque to dynamo (no guard on the list)
        if args[-1]:  # _gemv1's last argument: pdl
            launched.append(True)
        return inner(*args)

    monkeypatch.setattr(T, "_gemv1", spy)
    model = sharp_int4_tiny("cuda", torch.bfloat16, "int8")
    unfused = copy.deepcopy(model)
    dev = torch.device("cuda")
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    gen = Generator(model, None, dev, compile=True, compile_mode="regional", max_seq_len=256)
    assert kernel_pdl(model)
    assert_greedy_up_to_ties(unfused, [5, 6, 7, 8], gen.generate([[5, 6, 7, 8]], params)[0].token_ids)
    assert launched and llmopt.kernels.KERNEL_PDL is False
    assert not kernel_pdl(sharp_int4_tiny("cuda", torch.bfloat16, "nf4"))


def test_dense_gemv_deferred_fused_pdl_decodes_the_same(monkeypatch) -> None:
    """--dense-gemv with LLMOPT_DENSE_ONE_ROW=deferred, fused projections and
    LLMOPT_KERNEL_PDL=1 (the combination the next bf16 measurement tries): the fused swapped
    modules agree with F.linear at one row, and compiled greedy decode gives the plain model's
    tokens up to near ties."""
    import copy

    from tests.helpers import assert_greedy_up_to_ties

    import llmopt.models.gemv_linear as G

    model = _tiny_cuda(torch.bfloat16)
    plain = copy.deepcopy(model)
    monkeypatch.setattr(G, "DENSE_ONE_ROW", "deferred")
    monkeypatch.setenv("LLMOPT_KERNEL_PDL", "1")
    assert G.use_gemv_linears(model) > 0
    dev = torch.device("cuda")
    gen = Generator(model, None, dev, compile=True, compile_mode="regional", max_seq_len=256,
                    fuse_projections=True)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is G.GemvLinear
    x = torch.randn(1, 1, qkv.in_features, device=dev, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, qkv.weight, qkv.bias).float()
    assert ((qkv(x).float() - want).norm() / want.norm()).item() < 1e-2
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    assert_greedy_up_to_ties(plain, [5, 6, 7, 8], gen.generate([[5, 6, 7, 8]], params)[0].token_ids)
