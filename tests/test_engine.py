"""The continuous-batching engine: outputs under concurrency equal single-request greedy output."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.generate import Generator
from llmopt.engine.llm_engine import EngineConfig, LLMEngine
from llmopt.loading.loader import load_model, random_model
from llmopt.loading.presets import preset_config
from llmopt.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(n: int, vocab: int, lo: int = 1, hi: int = 60, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


def test_tiny_engine_matches_static_path_with_chunking_preemption_and_prefix_hits() -> None:
    cfg = preset_config("tiny")
    dev = torch.device("cpu")
    model = random_model(cfg, dev, torch.float32)
    prompts = _prompts(14, cfg.vocab_size)
    prompts += [prompts[0] + [5, 6, 7], list(prompts[3])]  # shared prefixes
    p = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    gen = Generator(model, None, dev)
    ref = [gen.generate([q], p)[0].token_ids for q in prompts]
    model.clear_caches()
    # A small pool and budget force chunked prefill, preemption and prefix-cache hits.
    engine = LLMEngine(model, None, dev, EngineConfig(num_kv_blocks=40, block_size=4,
                                                      max_num_batched_tokens=48, max_num_seqs=8))
    outs = engine.generate(prompts, p)
    assert [o.token_ids for o in outs] == ref
    st = engine.stats()
    assert st["preemptions"] > 0 and st["prefix_cache_hit_tokens"] > 0
    assert st["kv_blocks_used"] == 0 and not engine.has_unfinished()
    engine.scheduler.block_manager.check_invariants()


def test_default_model_concurrent_equals_single(default_model_dir: str) -> None:
    """Through the offline API (LLM(engine="paged")): batched output equals one-at-a-time greedy."""
    from llmopt.api import LLM

    lm = load_model(default_model_dir, device="cpu", progress=False)
    tok = lm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
             "The three primary colours are", "Water boils at"]
    p = SamplingParams(max_new_tokens=10, temperature=0)
    gen = Generator(lm.model, tok, lm.device)
    ref = [gen.generate([tok.encode(t)], p)[0] for t in texts]
    del lm, gen
    llm = LLM(default_model_dir, device="cpu", progress=False, engine="paged",
              engine_config=EngineConfig(num_kv_blocks=64, max_num_batched_tokens=32))
    outs = llm.generate(texts, p)
    assert [o.prompt for o in outs] == texts
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.text for o in outs] == [r.text for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]


def test_seeded_sampling_is_independent_of_batch_company() -> None:
    cfg = preset_config("tiny")
    dev = torch.device("cpu")
    model = random_model(cfg, dev, torch.float32)
    engine = LLMEngine(model, None, dev, EngineConfig(num_kv_blocks=64, block_size=4))
    prompts = _prompts(6, cfg.vocab_size, seed=2)
    seeded = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].token_ids
    other = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    mixed = engine.generate(prompts, [seeded] + [other] * 5)[0].token_ids
    assert alone == mixed
    assert engine.generate([prompts[0]], seeded)[0].token_ids == alone


def test_engine_rejects_prompts_that_cannot_fit() -> None:
    from llmopt.errors import UserError

    cfg = preset_config("tiny")
    dev = torch.device("cpu")
    engine = LLMEngine(random_model(cfg, dev, torch.float32), None, dev,
                       EngineConfig(num_kv_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(UserError):
        engine.add_request(list(range(3, 70)), SamplingParams(max_new_tokens=2))  # > context
    with pytest.raises(UserError):
        engine.add_request(list(range(3, 30)), SamplingParams(max_new_tokens=2))  # > pool
    with pytest.raises(UserError):
        engine.add_request([], SamplingParams())
    assert not engine.has_unfinished()


def test_bench_serve_workload_is_seeded_and_engine_run_completes() -> None:
    from llmopt.cli.bench_serve import BenchConfig, make_workload, run_engine, summarise

    cfg = BenchConfig(num_requests=12, input_len_min=4, input_len_max=20, output_len_min=2,
                      output_len_max=6, shared_prefix_len=8, request_rate=200.0, seed=5, vocab_size=512)
    w1, w2 = make_workload(cfg), make_workload(cfg)
    assert [(w.prompt_token_ids, w.output_len, w.arrival_s) for w in w1] == \
           [(w.prompt_token_ids, w.output_len, w.arrival_s) for w in w2]
    assert all(w.prompt_token_ids[:8] == w1[0].prompt_token_ids[:8] for w in w1)
    assert all(b.arrival_s > a.arrival_s for a, b in zip(w1, w1[1:], strict=False))
    model = random_model(preset_config("tiny"), torch.device("cpu"), torch.float32)
    engine = LLMEngine(model, None, torch.device("cpu"), EngineConfig(num_kv_blocks=64, block_size=4))
    results, duration, extra = run_engine(engine, w1, cfg)
    s = summarise(results, duration, extra)
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["output_tokens"] == sum(w.output_len for w in w1)
    assert s["prefix_cache_hit_rate"] > 0 and s["ttft_ms"]["p50"] > 0


@pytest.mark.gpu
def test_cuda_engine_graphs_match_static_path() -> None:
    cfg = preset_config("tiny")
    dev = torch.device("cuda")
    model = random_model(cfg, dev, torch.float32)
    prompts = _prompts(20, cfg.vocab_size, hi=100)
    p = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    gen = Generator(model, None, dev)
    ref = [gen.generate([q], p)[0].token_ids for q in prompts]
    model.clear_caches()
    engine = LLMEngine(model, None, dev, EngineConfig(max_num_seqs=16, max_model_len=256,
                                                      gpu_memory_utilization=0.3))
    assert engine.runner.graphs  # decode steps replay captured graphs
    assert [o.token_ids for o in engine.generate(prompts, p)] == ref
