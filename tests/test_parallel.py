"""Tensor parallelism on CPU: gloo, 2 processes.

One spawned 2-rank job (module fixture) runs every multi-process check and writes its numbers;
the tests below assert on them, so the interpreter start-up is paid once. Plans, sliced reads and
bad input are checked in this process; the CLI end to end through subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from llmopt.config import ModelConfig
from llmopt.loading.loader import random_model, save_checkpoint
from llmopt.loading.presets import preset_config

WORLD = 2
ATOL = 2e-5  # float32: the only difference is the order of the partial sums


def _variants() -> dict[str, ModelConfig]:
    tiny = preset_config("tiny")  # 4 query heads, 2 KV heads, vocab 512
    return {
        "gqa-split": tiny,
        "no-gqa": tiny.replace(num_kv_heads=4),
        "gqa-replicated": tiny.replace(num_kv_heads=1),
        # Qwen2-style biases, tied embeddings, a vocabulary that does not divide by 2 (padding).
        "bias-tied-odd-vocab": tiny.replace(
            vocab_size=509, qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
    }


def _quant_available() -> bool:
    try:
        from llmopt.quant import quantize_  # noqa: F401
    except ImportError:
        return False
    return True


def _build(config: ModelConfig, seed: int = 1) -> torch.nn.Module:
    model = random_model(config, torch.device("cpu"), torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                # Non-trivial biases and norms, so a bias added twice or lost would show.
                p.copy_(
                    torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0)
                )
    return model


def _run(model: torch.nn.Module) -> torch.Tensor:
    """Prefill logits, then three cached decode steps: [B, 7 + 3, V]."""
    ids = torch.randint(
        0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5)
    )
    model.setup_caches(2, 32)
    with torch.inference_mode():
        out = [model(ids, kv_len=7)]
        tok = out[-1][:, -1].argmax(-1)
        for i in range(3):
            pos = torch.full((2, 1), 7 + i)
            out.append(model(tok[:, None], pos, kv_len=8 + i))
            tok = out[-1][:, -1].argmax(-1)
    return torch.cat(out, dim=1)


def _byte_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer with 256 tokens (no merges): real encode/decode, tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text("{}")


def _save_tiny(out_dir: Path, config: ModelConfig, seed: int = 3) -> Path:
    save_checkpoint(_build(config, seed), None, out_dir)
    _byte_tokenizer(out_dir)
    return out_dir


# -- the spawned ranks ---------------------------------------------------------------------------
def _worker(rank: int, port: int, out_dir: str, ckpt: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from llmopt.loading.loader import load_model
    from llmopt.parallel.loading import load_sharded, make_comm
    from llmopt.parallel.process_group import init_tp, shutdown_tp
    from llmopt.parallel.sharding import shard_model

    tp = init_tp(WORLD, "cpu")
    res: dict[str, Any] = {}

    def compare(name: str, model: torch.nn.Module, quant: str | None = None, fuse: bool = False) -> None:
        if quant is not None:
            from llmopt.quant import quantize_

            quantize_(model, quant)
        ref = _run(model)
        shard_model(model, make_comm(tp))
        fused = 0
        if fuse:  # after sharding, as --fuse-projections does: each rank joins its own shards
            from llmopt.models.fusion import fuse_projections

            fused = fuse_projections(model)
        got = _run(model)
        res[name] = {
            "fused": fused,
            "max_diff": (got - ref).abs().max().item(),
            "ref_max": ref.abs().max().item(),
            "shape": list(got.shape),
            "q_heads": model.model.layers[0].self_attn.num_heads,
            "kv_heads": model.model.layers[0].self_attn.num_kv_heads,
        }

    for name, config in _variants().items():
        compare(name, _build(config))
    if _quant_available():
        compare("int8", _build(preset_config("tiny")), "int8")
        compare("int4-g32", _build(preset_config("tiny")), "int4-g32")
        compare("int8-g32", _build(preset_config("tiny")), "int8-g32")
        compare("int8-fused", _build(preset_config("tiny")), "int8", fuse=True)
        # one KV head, replicated on both ranks: each rank's q/k/v shards still join
        compare("int4-g32-fused", _build(preset_config("tiny").replace(num_kv_heads=1)), "int4-g32", fuse=True)

    # --dense-gemv out on a sharded bf16 model: o_proj and down_proj are row shards, whose
    # all-reduce hook must survive the swap (on CPU the swapped modules compute with F.linear).
    from llmopt.models.gemv_linear import GemvLinear, use_gemv_linears

    bf16 = random_model(preset_config("tiny"), torch.device("cpu"), torch.bfloat16, seed=4)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = bf16(ids).float()
        shard_model(bf16, make_comm(tp))
        swapped = use_gemv_linears(bf16, "out")
        got = bf16(ids).float()
    res["gemv-out"] = {
        "swapped": swapped,
        "hooked": sum(bool(m._forward_hooks) for m in bf16.modules() if isinstance(m, GemvLinear)),
        "max_diff": (got - ref).abs().max().item(),
        "ref_max": ref.abs().max().item(),
    }

    # Sharded loading from a saved checkpoint: logits and bytes read.
    full = load_model(ckpt, device="cpu", dtype="float32")
    ref = _run(full.model)
    sharded = load_sharded(ckpt, tp, dtype="float32")
    got = _run(sharded.model)
    local_bytes = sum(t.numel() * t.element_size() for t in sharded.model.state_dict().values())
    res["loaded"] = {
        "max_diff": (got - ref).abs().max().item(),
        "bytes_read": sharded.bytes_read,
        "local_bytes": local_bytes,
        "file_bytes": sum(t.numel() * t.element_size() for t in full.model.state_dict().values()),
    }

    # A random preset built sharded on this rank.
    pre = load_sharded("preset:tiny", tp, dtype="float32")
    logits = _run(pre.model)
    res["preset"] = {
        "shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "local_params": sum(p.numel() for p in pre.model.parameters()),
        "full_params": pre.config.num_params,
    }
    # The serving engine: rank 0 schedules and broadcasts each step, rank 1 follows.
    from llmopt.engine.llm_engine import EngineConfig, LLMEngine
    from llmopt.parallel.serving import make_tp_runner, run_worker
    from llmopt.sampling import SamplingParams

    ecfg = EngineConfig(num_kv_blocks=48, max_num_seqs=3, max_num_batched_tokens=64, max_model_len=256)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (7, 40, 90, 3, 21)]
    sp = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    if tp.is_main:  # the single-process engine on the whole model, for reference
        res["served_ref"] = [o.token_ids for o in LLMEngine(full.model, None, full.device, ecfg).generate(prompts, sp)]
    served = load_sharded(ckpt, tp, dtype="float32")
    engine = LLMEngine(served.model, None, served.device, ecfg, make_runner=make_tp_runner(tp))
    if tp.is_main:
        res["served"] = [o.token_ids for o in engine.generate(prompts, sp)]
        engine.runner.stop()
    else:
        res["worker_steps"] = run_worker(engine.runner, tp)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(res))
    shutdown_tp(barrier=True)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from llmopt.parallel.launch import free_port

    root = tmp_path_factory.mktemp("tp")
    ckpt = _save_tiny(root / "ckpt", preset_config("tiny"))
    mp.spawn(_worker, args=(free_port(), str(root), str(ckpt)), nprocs=WORLD, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("variant", list(_variants()))
def test_tp2_logits_equal_tp1(tp_results: list[dict[str, Any]], variant: str) -> None:
    cfg = _variants()[variant]
    for rank, res in enumerate(tp_results):
        r = res[variant]
        assert r["shape"] == [2, 10, cfg.vocab_size]  # full vocabulary after the gather
        assert r["max_diff"] <= ATOL * max(1.0, r["ref_max"]), (rank, r)
        assert r["q_heads"] == cfg.num_heads // WORLD
        expected_kv = cfg.num_kv_heads // WORLD if cfg.num_kv_heads % WORLD == 0 else 1
        assert r["kv_heads"] == expected_kv


def test_tp2_dense_gemv_out_keeps_the_all_reduce(tp_results: list[dict[str, Any]]) -> None:
    """--dense-gemv out after sharding: each rank's o_proj and down_proj row shards take the
    one-row module and keep their all-reduce hook, so bf16 prefill logits stay those of the
    unsplit model (a lost all-reduce would leave each rank half of every sum)."""
    layers = preset_config("tiny").num_layers
    for rank, res in enumerate(tp_results):
        r = res["gemv-out"]
        assert r["swapped"] == r["hooked"] == 2 * layers, (rank, r)
        assert r["max_diff"] <= 3e-2 * r["ref_max"], (rank, r)


@pytest.mark.parametrize("scheme", ["int8", "int8-g32", "int4-g32", "int8-fused", "int4-g32-fused"])
def test_tp2_quantised_logits_equal_tp1(tp_results: list[dict[str, Any]], scheme: str) -> None:
    """Quantised models sharded over two ranks; ``-fused``: then q/k/v and gate/up joined on each
    rank (``--fuse-projections``), every layer's groups."""
    if not _quant_available():
        pytest.skip("llmopt.quant is not importable")
    for res in tp_results:
        r = res[scheme]
        assert r["max_diff"] <= ATOL * max(1.0, r["ref_max"]), r
        assert r["fused"] == (2 * preset_config("tiny").num_layers if scheme.endswith("-fused") else 0)


def test_sharded_checkpoint_loading(tp_results: list[dict[str, Any]]) -> None:
    for res in tp_results:
        r = res["loaded"]
        assert r["max_diff"] <= ATOL * 10
        # Each rank read and holds about half the model (norms are replicated: tiny).
        assert abs(r["bytes_read"] / r["file_bytes"] - 1 / WORLD) < 0.02, r
        assert abs(r["local_bytes"] / r["file_bytes"] - 1 / WORLD) < 0.02, r


def test_tp2_serving_engine_matches_one_process(tp_results: list[dict[str, Any]]) -> None:
    """Continuous batching under TP=2 (prompts longer than the step's token budget, so prefill
    is chunked; more requests than seats): rank 0's tokens equal the one-process engine's, and
    the worker ran a step for each of rank 0's steps."""
    main, worker = tp_results
    assert main["served"] == main["served_ref"]
    assert all(len(t) == 12 for t in main["served"])
    assert worker["worker_steps"] >= 12 + 90 // 64


def test_preset_built_sharded(tp_results: list[dict[str, Any]]) -> None:
    for res in tp_results:
        r = res["preset"]
        assert r["finite"] and r["shape"] == [2, 10, 512]
        assert abs(r["local_params"] / r["full_params"] - 1 / WORLD) < 0.02, r


# -- plans, in this process ----------------------------------------------------------------------
def _covered_once(plans: list[Any], name: str, full_len: int) -> bool:
    ranges = sorted(r for p in plans for r in p.tensors[name].pieces)
    pos = 0
    for a, b in ranges:
        if a != pos:
            return False
        pos = b
    return pos == full_len


@pytest.mark.parametrize(
    "variant,world",
    [
        ("gqa-split", 2),
        ("no-gqa", 4),
        ("bias-tied-odd-vocab", 2),
        ("gqa-replicated", 2),
        ("gqa-split-int8", 2),
        ("gqa-split-int4", 2),
    ],
)
def test_plan_covers_every_parameter_exactly_once(variant: str, world: int) -> None:
    from llmopt.parallel.sharding import make_plan, take

    base = variant.removesuffix("-int8").removesuffix("-int4")
    with torch.device("meta"):
        from llmopt.models import build_model

        model = build_model(_variants()[base])
    if variant != base:
        if not _quant_available():
            pytest.skip("llmopt.quant is not importable")
        from llmopt.quant import quantize_

        model = _build(_variants()[base])
        quantize_(model, "int8" if variant.endswith("int8") else "int4-g32")
    state = model.state_dict()
    plans = [make_plan(model, world, r) for r in range(world)]
    for p in plans:
        assert set(p.tensors) == set(state)  # every tensor has exactly one rule
    for name, t in state.items():
        shards = [p.tensors[name] for p in plans]
        if shards[0].dim is None:
            assert all(s.dim is None for s in shards)
            if name.endswith("bias") and any(s.zeros for s in shards):
                assert [s.zeros for s in shards] == [False] + [True] * (world - 1)  # added once
            continue
        full_len = t.shape[shards[0].dim]
        if variant == "gqa-replicated" and (".k_proj." in name or ".v_proj." in name):
            continue  # KV heads deliberately live on several ranks
        assert _covered_once(plans, name, full_len), name
        if t.device.type != "meta":  # the slices put back together give the tensor
            parts = [
                take(t, s, tuple(t.shape)).narrow(s.dim, 0, sum(b - a for a, b in s.pieces))
                for s in shards
            ]
            assert torch.equal(torch.cat(parts, dim=shards[0].dim), t), name


def test_split_heads() -> None:
    from llmopt.parallel.sharding import split_heads

    assert split_heads(8, 8, 2, 1).kv_heads == (4, 5, 6, 7)
    assert split_heads(8, 2, 2, 1).kv_heads == (1,)
    assert split_heads(8, 2, 4, 3) == split_heads(8, 2, 4, 3)
    assert split_heads(8, 2, 4, 3).kv_heads == (1,)  # two ranks share KV head 1
    # 12 query heads over 3 KV heads on 2 ranks: rank 0's heads 0-5 read KV 0 (x4) and 1 (x2),
    # unevenly, so it keeps one KV head per query head.
    s = split_heads(12, 3, 2, 0)
    assert s.q_heads == tuple(range(6)) and s.kv_heads == (0, 0, 0, 0, 1, 1)


def test_uneven_gqa_split_matches_full_model() -> None:
    """Replicated, repeated KV heads (12 query / 3 KV heads on 2 ranks), checked without a group:
    each rank's attention output through o_proj, summed by hand, equals the full layer's."""
    from llmopt.parallel.collectives import TPComm
    from llmopt.parallel.sharding import make_plan

    cfg = preset_config("tiny").replace(num_heads=12, num_kv_heads=3, head_dim=16, hidden_size=64)
    full = _build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        x = full.model.embed_tokens(ids)
        positions = torch.arange(6)[None]
        full._ensure_rope(6, x.device)
        meta = full.attention.prepare(positions, positions, None, None)
        cos, sin = full.rope_cos[positions][:, None], full.rope_sin[positions][:, None]
        attn = full.model.layers[0].self_attn
        ref = attn(x, cos, sin, meta, full.attention)
        total = torch.zeros_like(ref)
        for rank in range(2):
            part = _build(cfg)
            comm = TPComm(None, rank, 1, "gloo")  # world 1: hooks do not reduce
            plan = make_plan(part, 2, rank)
            from llmopt.parallel.sharding import apply_transforms, assign_tensors, take

            state = part.state_dict()
            local = {
                n: take(state[n], s, tuple(state[n].shape)).clone() for n, s in plan.tensors.items()
            }
            apply_transforms(part, plan, comm)
            assign_tensors(part, local)
            a = part.model.layers[0].self_attn
            assert a.num_kv_heads == 6  # one per local query head
            total += a(x, cos, sin, meta, part.attention)
    assert (total - ref).abs().max().item() < 1e-5


def test_sliced_reads_from_safetensors(tmp_path: Path) -> None:
    """The loader reads rank r's rows through safetensors slices, without the whole tensor."""
    from llmopt.models import build_model
    from llmopt.parallel.loading import read_sharded_state
    from llmopt.parallel.sharding import make_plan

    cfg = preset_config("tiny")
    ckpt = _save_tiny(tmp_path / "ckpt", cfg)
    full = _build(cfg, seed=3).state_dict()
    with torch.device("meta"):
        skeleton = build_model(cfg)
    expected = {n: p.shape for n, p in skeleton.state_dict().items()}
    total = sum(t.numel() * 4 for t in full.values())
    for rank in range(WORLD):
        plan = make_plan(skeleton, WORLD, rank)
        state, nbytes = read_sharded_state(
            ckpt, plan, expected, torch.device("cpu"), torch.float32, False
        )
        assert abs(nbytes / total - 1 / WORLD) < 0.02
        q = "model.layers.1.self_attn.q_proj.weight"
        rows = full[q].shape[0] // WORLD
        assert torch.equal(state[q], full[q][rank * rows : (rank + 1) * rows])
        o = "model.layers.1.self_attn.o_proj.weight"
        cols = full[o].shape[1] // WORLD
        assert torch.equal(state[o], full[o][:, rank * cols : (rank + 1) * cols])


# -- CLI and launcher ----------------------------------------------------------------------------
def _llmopt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "llmopt", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_generate_tp2_matches_tp1(tmp_path: Path) -> None:
    ckpt = _save_tiny(tmp_path / "ckpt", preset_config("tiny"))
    common = [
        "generate",
        "-m",
        str(ckpt),
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--json",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "-p",
        "Hello, tensor parallel world",
    ]
    one = _llmopt(*common)
    two = _llmopt(*common, "--tp", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, (two.returncode, two.stdout[-500:], two.stderr[-2000:])
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert len(a["token_ids"]) == 8
    assert a["token_ids"] == b["token_ids"], (a, b)
    assert len(two.stdout.strip().splitlines()) == 1, two.stdout  # only rank 0 printed


def test_cli_generate_tp2_quantised_matches_tp1_quantised(tmp_path: Path) -> None:
    """--quant under --tp: each rank quantises the whole model, then keeps its slices (split
    along whole quantisation groups), so the tokens are those of one device with --quant."""
    ckpt = _save_tiny(tmp_path / "ckpt", preset_config("tiny"))
    common = ["generate", "-m", str(ckpt), "--device", "cpu", "--temperature", "0", "--json",
              "--max-new-tokens", "8", "--ignore-eos", "-p", "Hello, quantised world",
              "--quant", "int4-g32"]
    one = _llmopt(*common)
    two = _llmopt(*common, "--tp", "2")
    plain = _llmopt(*common[:-2])
    assert one.returncode == 0 and two.returncode == 0 and plain.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["token_ids"] == b["token_ids"], (a, b)
    # and the quantisation was applied: these weights give other tokens unquantised
    assert json.loads(plain.stdout)["token_ids"] != a["token_ids"]


def test_cli_speculative_tp2_matches_tp1(tmp_path: Path) -> None:
    """--draft under --tp: the draft (here the sharded model's own first layer) proposes on every
    rank alike, and the greedy tokens are those of one process. With adaptive k the ranks choose k
    by the cost model, not by their own step timings, so that every rank verifies the same width."""
    ckpt = _save_tiny(tmp_path / "ckpt", preset_config("tiny"))
    common = ["generate", "-m", str(ckpt), "--device", "cpu", "--temperature", "0", "--json",
              "--max-new-tokens", "12", "--ignore-eos", "-p", "abcabcabc abcabc", "--speculate-k", "3"]
    fixed = [*common, "--draft", "self-layers:1", "--fixed-k"]
    one, two = _llmopt(*fixed), _llmopt(*fixed, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12
    assert b["speculative"]["drafted_tokens"] > 0
    adaptive = _llmopt(*common, "--draft", "ngram", "--tp", "2")
    assert adaptive.returncode == 0, adaptive.stderr[-2000:]
    c = json.loads(adaptive.stdout)
    assert c["token_ids"] == a["token_ids"] and c["speculative"]["step_costs"] == "modelled"


def test_cli_bench_tp2_reports_per_rank(tmp_path: Path) -> None:
    """bench --tp 2: the ranks run the bench together, rank 0 alone reports, and its roofline
    counts one rank's weights: about half of the TP=1 bytes (norms are replicated)."""
    ckpt = _save_tiny(tmp_path / "ckpt", preset_config("tiny"))
    common = ["bench", "-m", str(ckpt), "--device", "cpu", "--new-tokens", "8", "--runs", "3"]
    one = _llmopt(*common, "--json", str(tmp_path / "one.json"))
    two = _llmopt(*common, "--tp", "2", "--json", str(tmp_path / "two.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("decode tok/s (per seq)") == 1  # one table: rank 0's
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert b["extra"]["tp"] == 2 and b["extra"]["allreduce"] == "gloo"
    assert 0.45 < b["weight_bytes"] / a["weight_bytes"] < 0.55, (a["weight_bytes"], b["weight_bytes"])
    assert b["decode_tokens_per_s"] > 0


def test_cli_eval_tp2_matches_tp1(tmp_path: Path) -> None:
    """eval --tp 2: perplexity, and agreement/KL against an unsharded reference, equal the
    single-process numbers (float32), with the model quantised (int8) so KL is not zero."""
    ckpt = _save_tiny(tmp_path / "ckpt", preset_config("tiny"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession "
                      "of a good fortune, must be in want of a wife. " * 12)
    common = ["eval", "-m", str(ckpt), "--device", "cpu", "--corpus", str(corpus), "--window", "128",
              "--stride", "64", "--quant", "int8", "--reference", str(ckpt)]
    one = _llmopt(*common, "--json", str(tmp_path / "one.json"))
    two = _llmopt(*common, "--tp", "2", "--json", str(tmp_path / "two.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(two.stdout.strip().splitlines()) == 1, two.stdout  # rank 0's line only
    a = json.loads((tmp_path / "one.json").read_text())["result"]
    b = json.loads((tmp_path / "two.json").read_text())["result"]
    assert a["tokens_scored"] == b["tokens_scored"] > 1000
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-4 * a["perplexity"], (a, b)
    assert a["kl"] > 0 and abs(a["kl"] - b["kl"]) < 1e-4 + 1e-3 * a["kl"], (a, b)
    assert a["agreement"] == b["agreement"]


def test_launcher_stops_all_ranks_when_one_dies() -> None:
    from llmopt.parallel.launch import launch_ranks

    script = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n"
    t0 = time.monotonic()
    rc = launch_ranks([sys.executable, "-c", script], 2)
    assert rc == 3
    assert time.monotonic() - t0 < 20  # rank 0 was stopped, not waited for


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from llmopt.cli.main import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(_save_tiny(tmp_path_factory.mktemp("tpbad") / "ckpt", preset_config("tiny")))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tp", "3"], "4 attention heads, which --tp 3 does not divide"),
        (["--tp", "0"], "--tp must be a positive integer"),
        (["--tp", "2", "--device", "cuda:1"], "needs one per rank"),
        (["--tp", "2", "--tp-allreduce", "symm-one-shot"], "needs GPUs"),
        (["--tp", str(max(2, torch.cuda.device_count() + 1)), "--device", "cuda"], "GPU"),
    ],
)
def test_bad_tp_requests_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_ckpt: str,
    extra: list[str],
    message: str,
) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    device = [] if "--device" in extra else ["--device", "cpu"]
    rc, err = _main(capsys, "generate", "-m", tiny_ckpt, "-p", "hi", *device, *extra)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_mismatched_launcher_environment_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_ckpt: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    rc, err = _main(capsys, "generate", "-m", tiny_ckpt, "-p", "hi", "--device", "cpu", "--tp", "2")
    assert rc == 2 and "started 3 rank(s)" in err and len(err.strip().splitlines()) == 1, err


def test_intermediate_size_must_divide() -> None:
    from llmopt.errors import UserError
    from llmopt.parallel.sharding import validate_config

    with pytest.raises(UserError, match="intermediate size"):
        validate_config(preset_config("tiny").replace(intermediate_size=130), 4)
    validate_config(preset_config("tiny"), 4)  # 4 heads, 2 KV heads (replicated), 128: fine


def test_fused_projections_must_be_split_first() -> None:
    from llmopt.errors import UserError
    from llmopt.models.fusion import fuse_projections
    from llmopt.parallel.sharding import make_plan

    model = _build(preset_config("tiny"))
    fuse_projections(model)
    with pytest.raises(UserError, match="before fusing"):
        make_plan(model, 2, 0)


def test_allreduce_auto_is_symmetric_memory_on_gpus_only() -> None:
    """--tp-allreduce auto (the default) picks the measured-fastest all-reduce per device, and
    an explicit choice is kept as given."""
    import torch

    from llmopt.parallel.process_group import resolve_allreduce

    assert resolve_allreduce("auto", torch.device("cuda", 1)) == "symm-one-shot"
    assert resolve_allreduce("auto", torch.device("cpu")) == "nccl"  # gloo's own all-reduce
    assert resolve_allreduce("nccl", torch.device("cuda", 0)) == "nccl"
    assert resolve_allreduce("symm-two-shot", torch.device("cuda", 0)) == "symm-two-shot"


def test_shutdown_releases_captured_graphs_before_destroying_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph that captured a collective holds its NCCL communicator, whose destroy then
    waits forever (the TP=2 exit hang on 2 H200s): the shutdown resets every registered graph,
    then destroys the group. CPU stand-in: a one-rank gloo group and a graph-like object."""
    import torch.distributed as dist

    from llmopt import devices
    from llmopt.parallel import process_group as pg

    events: list[str] = []

    class CapturedGraph:
        def reset(self) -> None:
            events.append("graph reset")

    graph = CapturedGraph()
    devices._GRAPHS.add(graph)  # type: ignore[arg-type]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (events.append("group destroyed"), destroy())[1])
    monkeypatch.setattr(pg, "_CURRENT", object())
    pg.shutdown_tp(barrier=True)
    assert events == ["graph reset", "group destroyed"]
    assert not dist.is_initialized()
    assert list(devices._GRAPHS) == []  # released graphs are forgotten
