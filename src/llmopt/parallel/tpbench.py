"""Tensor-parallel device measurements (driven by ``bench/device/tp.sh``; CPU runs for tests).

    python -m llmopt.parallel.tpbench allreduce --tp 2 --out ar.json
    python -m llmopt.parallel.tpbench decode --tp 2 --model preset:llama-2-7b --mode graph \\
        --allreduce nccl --allreduce symm-one-shot --out dec.json
    python -m llmopt.parallel.tpbench summary a.json b.json ...

``allreduce``: one small all-reduce (default 8 KB of bf16, batch-1 decode's message) timed eager
and inside a CUDA graph, for NCCL and symmetric-memory one-shot/two-shot, each checked for the
right sum first; plus the device-to-device copy bandwidth.
``decode``: batch-1 greedy decode of random-weight presets (5-token prompt, 200 new tokens;
median of 3 runs). Modes: ``eager``; ``graph`` (the eager decode step captured in one CUDA graph,
no compiler: cheap to set up); ``compile`` (``engine.generate.Generator(compile=True)``, the
project's compiled decode: whole-step reduce-overhead under TP); ``regional`` (the same with
``compile_mode="regional"``: one compiled layer for all, the step captured as one CUDA graph,
collectives included; a short cold compile for 13B and 70B). Started with ``--tp N`` and no launcher variables,
it launches its own N ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmopt.devices import new_cuda_graph
from llmopt.parallel.process_group import TPContext, init_tp, rank_env, shutdown_tp

log = logging.getLogger(__name__)


# -- helpers ----------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _barrier(tp: TPContext | None) -> None:
    if tp is not None:
        tp.barrier()


def copy_bandwidth(dev: torch.device) -> float | None:
    """The device's copy bandwidth in TB/s (bytes read plus written), measured as ``llmopt
    bench`` measures it (``llmopt.devices.copy_bandwidth``); None off GPUs."""
    from llmopt.devices import copy_bandwidth as measure

    return measure(dev) / 1e12 if dev.type == "cuda" else None


def _env_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            pass
    from llmopt.bench.latency import settings_env

    info["settings"] = settings_env()
    return info


# -- all-reduce micro-benchmark -------------------------------------------------------------------
def bench_allreduce(
    tp: TPContext, numels: list[int], iters: int, graph_calls: int
) -> list[dict[str, Any]]:
    from llmopt.parallel.loading import make_comm

    dev = tp.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    comm = make_comm(tp)
    modes = ["nccl"] + (["symm-one-shot", "symm-two-shot"] if dev.type == "cuda" else [])
    results = []
    for mode in modes:
        try:
            if mode == "nccl":
                comm.disable_symm_mem()
            else:
                comm.enable_symm_mem(mode, dtype, dev)
        except Exception as e:
            results.append({"method": mode, "error": f"{type(e).__name__}: {e}"})
            continue
        for numel in numels:
            r: dict[str, Any] = {
                "method": mode,
                "numel": numel,
                "bytes": numel * torch.tensor([], dtype=dtype).element_size(),
            }
            try:
                x = torch.full((numel,), float(tp.rank + 1), dtype=dtype, device=dev)
                want = tp.world_size * (tp.world_size + 1) / 2
                got = comm.all_reduce(x.clone())
                r["correct"] = bool((got == want).all().item())

                def step(x: torch.Tensor = x) -> torch.Tensor:
                    return comm.all_reduce(x.clone())

                for _ in range(20):
                    step()
                _sync(dev)
                _barrier(tp)
                t0 = time.perf_counter()
                for _ in range(iters):
                    step()
                _sync(dev)
                r["eager_us"] = (time.perf_counter() - t0) / iters * 1e6
                if dev.type == "cuda":
                    g = new_cuda_graph()
                    with torch.cuda.graph(g):
                        outs = [step() for _ in range(graph_calls)]
                    g.replay()
                    _sync(dev)
                    r["graph_correct"] = bool(all((o == want).all().item() for o in outs))
                    _barrier(tp)
                    reps = max(1, iters // graph_calls)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        g.replay()
                    _sync(dev)
                    r["graph_us"] = (time.perf_counter() - t0) / (reps * graph_calls) * 1e6
                    del g, outs
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.append(r)
    comm.disable_symm_mem()
    return results


# -- decode ---------------------------------------------------------------------------------------
def _decode_step_graph(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    cache_len: int,
    dev: torch.device,
    tp: TPContext | None,
    runs: int,
    use_graph: bool,
) -> list[float]:
    """Greedy decode with the eager step, optionally captured in one CUDA graph; tok/s per run."""
    model.setup_caches(1, cache_len)
    plen = prompt.shape[1]
    with torch.inference_mode():
        logits = model(prompt, kv_len=plen)  # [1, P, V]
        tok = logits[:, -1].argmax(-1).view(1, 1)  # [1, 1]
        pos = torch.full((1, 1), plen, dtype=torch.long, device=dev)

        def step() -> None:
            nxt = model(tok, pos)[:, -1].argmax(-1)  # whole static cache, masked by position
            tok.copy_(nxt.view(1, 1))
            pos.add_(1)

        run_step = step
        if use_graph:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = new_cuda_graph()
            with torch.cuda.graph(graph):
                step()
            run_step = graph.replay
        else:
            for _ in range(3):
                step()
        speeds = []
        for _ in range(runs):
            pos.fill_(plen)
            _sync(dev)
            _barrier(tp)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                run_step()
            _sync(dev)
            speeds.append(new_tokens / (time.perf_counter() - t0))
    return speeds


def _decode_compiled(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    cache_len: int,
    dev: torch.device,
    tp: TPContext | None,
    runs: int,
    compile_mode: str = "auto",
    profile_dir: Path | None = None,
    dense_gemv: str | None = None,
) -> tuple[list[float], float, str]:
    """The project's compiled decode (``Generator(compile=True)``); (tok/s per run, compile s,
    which linears took the one-row kernel). ``profile_dir``: one more run under torch.profiler,
    its top-kernels table written there. ``dense_gemv``: ``Generator``'s (None: its default)."""
    import inspect

    from llmopt.engine.generate import Generator
    from llmopt.sampling import SamplingParams

    if "compile" not in inspect.signature(Generator.__init__).parameters:
        raise RuntimeError("this checkout's Generator has no compile option")
    gen = Generator(model, None, dev, compile=True, compile_mode=compile_mode, max_seq_len=cache_len,
                    dense_gemv=dense_gemv)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [prompt[0].tolist()]
    _barrier(tp)
    t0 = time.perf_counter()
    gen.generate(ids, params)  # compiles (prefill eager, decode graph)
    compile_s = time.perf_counter() - t0
    gen.generate(ids, params)
    speeds = []
    for _ in range(runs):
        _barrier(tp)
        out = gen.generate(ids, params)[0]
        assert out.stats is not None
        speeds.append(out.stats.decode_tokens_per_s)
    if profile_dir is not None:
        from llmopt.bench.latency import profile_run

        _barrier(tp)
        profile_run(lambda: gen.generate(ids, params), profile_dir, dev, trace=False)
    return speeds, compile_s, gen.dense_gemv


def _profile_dir(
    root: str | None, spec: str, mode: str, ar: str, tp: TPContext | None
) -> Path | None:
    """Where one (model, mode, all-reduce) run's profile goes: one folder per rank."""
    if root is None:
        return None
    name = spec.removeprefix("preset:").replace("/", "_")
    rank = tp.rank if tp is not None else 0
    return Path(root) / f"{name}_tp{tp.world_size if tp else 1}_{mode}_{ar}_rank{rank}"


def bench_decode(
    args: argparse.Namespace, tp: TPContext | None, save: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    from llmopt.attention.base import resolve_backend_name
    from llmopt.bench.latency import weight_bytes_read_per_token
    from llmopt.devices import resolve_device, resolve_dtype
    from llmopt.loading.loader import load_model
    from llmopt.parallel.loading import load_sharded

    dev = tp.device if tp is not None else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    bw = copy_bandwidth(dev)
    results: list[dict[str, Any]] = []
    cache_len = -(-(args.prompt_len + args.new_tokens + 8) // 256) * 256
    for spec in args.model:
        t0 = time.perf_counter()
        try:
            if tp is None:
                loaded: Any = load_model(spec, device=dev, dtype=dtype)
                comm = None
            else:
                loaded = load_sharded(spec, tp, dtype=dtype)
                comm = loaded.comm
        except Exception as e:
            results.append(
                {"model": spec, "tp": args.tp, "error": f"load: {type(e).__name__}: {e}"}
            )
            continue
        load_s = time.perf_counter() - t0
        model = loaded.model
        attention = resolve_backend_name(args.attention, dev)  # auto: as llmopt bench
        model.set_attention_backend(attention)
        wbytes = weight_bytes_read_per_token(model)  # as llmopt bench counts them
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, loaded.config.vocab_size, (1, args.prompt_len), generator=gen).to(
            dev
        )
        for mode in args.mode:
            for ar in args.allreduce if tp is not None else ["none"]:
                r: dict[str, Any] = {
                    "model": spec,
                    "tp": args.tp,
                    "mode": mode,
                    "allreduce": ar,
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": 1,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "random_weights": True,
                    "attention": attention,
                    "load_s": round(load_s, 2),
                    "weight_gb_per_rank": wbytes / 1e9,
                }
                try:
                    if comm is not None:
                        comm.disable_symm_mem()
                        if ar in ("symm-one-shot", "symm-two-shot"):
                            comm.enable_symm_mem(ar, dtype, dev)
                        elif ar == "symm-inductor" and not comm.enable_inductor_symm_mem():
                            raise RuntimeError(
                                "this torch has no inductor symmetric-memory lowering"
                            )
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    if mode in ("compile", "regional"):
                        from llmopt.engine.compile import inductor_settings

                        torch._dynamo.reset()
                        speeds, compile_s, r["dense_gemv"] = _decode_compiled(
                            model, prompt, args.new_tokens, cache_len, dev, tp, args.runs,
                            "regional" if mode == "regional" else "auto",
                            _profile_dir(args.profile, spec, mode, ar, tp),
                            None if args.dense_gemv == "auto" else args.dense_gemv,
                        )
                        r["compile_s"] = round(compile_s, 1)
                        r["inductor_settings"] = inductor_settings(model)  # after the swap
                    else:
                        speeds = _decode_step_graph(
                            model,
                            prompt,
                            args.new_tokens,
                            cache_len,
                            dev,
                            tp,
                            args.runs,
                            use_graph=(mode == "graph"),
                        )
                    r["tok_s_runs"] = [round(s, 2) for s in speeds]
                    r["tok_s"] = round(statistics.median(speeds), 2)
                    r["achieved_tbps_per_rank"] = r["tok_s"] * wbytes / 1e12
                    if bw is not None:
                        r["copy_tbps"] = round(bw, 3)
                        r["roofline_tok_s"] = round(bw * 1e12 / wbytes, 1)
                        r["pct_roofline"] = round(100 * r["tok_s"] / r["roofline_tok_s"], 1)
                    if dev.type == "cuda":
                        r["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
                except Exception as e:
                    log.exception("decode %s %s %s failed", spec, mode, ar)
                    r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                results.append(r)
                save(results)  # after every result: a step killed by its time limit keeps the rest
                if tp is None or tp.is_main:
                    print(_row(r), flush=True)
        if comm is not None:
            comm.disable_symm_mem()
        del model, loaded
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -- summary ---------------------------------------------------------------------------------
def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        what = r.get("model", r.get("method", "?"))
        how = f"tp={r.get('tp', '?')} {r.get('mode', '')} {r.get('allreduce', '')}"
        return f"{what:<22} {how}: ERROR {r['error']}"
    if "method" in r:
        g = f"{r['graph_us']:8.1f}" if "graph_us" in r else "       -"
        return (
            f"all-reduce {r['method']:<14} {r['bytes']:>8} B  eager {r['eager_us']:8.1f} us  "
            f"graph {g} us  correct {r.get('correct')}/{r.get('graph_correct', '-')}"
        )
    roof = f"{r['pct_roofline']:5.1f}% of {r['roofline_tok_s']:.0f}" if "pct_roofline" in r else ""
    if r.get("dense_gemv", "none") != "none":
        roof += f"  (one-row kernel: {r['dense_gemv']})"
    return (
        f"{r['model']:<22} tp={r['tp']} {r['mode']:<8} {r['allreduce']:<14} "
        f"{r['tok_s']:8.1f} tok/s  {roof}"
    )


def summarize(paths: list[str]) -> str:
    rows: list[dict[str, Any]] = []
    env: dict[str, Any] = {}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        env = env or data.get("env", {})
        rows.extend(data.get("results", []))
    lines = [f"env: {json.dumps(env)}"]
    bws = {r["copy_tbps"] for r in rows if "copy_tbps" in r}
    if bws:
        lines.append(
            f"copy bandwidth (read+write) per GPU: {', '.join(f'{b:.2f}' for b in sorted(bws))} TB/s"
        )
    lines += [_row(r) for r in rows]
    # TP=2 over TP=1 speed-ups, per model and mode (best all-reduce at TP=2).
    best: dict[tuple[str, str, int], float] = {}
    for r in rows:
        if "tok_s" in r:
            key = (r["model"], r["mode"], r["tp"])
            best[key] = max(best.get(key, 0.0), r["tok_s"])
    for (model, mode, tpn), v in sorted(best.items()):
        base = best.get((model, mode, 1))
        if tpn > 1 and base:
            lines.append(
                f"speed-up {model} {mode}: TP={tpn} {v:.1f} / TP=1 {base:.1f} = {v / base:.2f}x"
            )
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llmopt.parallel.tpbench")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("allreduce")
    a.add_argument(
        "--numel",
        type=int,
        action="append",
        default=None,
        help="elements per all-reduce (repeatable; default 4096 = 8 KB of bf16)",
    )
    a.add_argument("--iters", type=int, default=500)
    a.add_argument("--graph-calls", type=int, default=100)
    d = sub.add_parser("decode")
    d.add_argument("--model", action="append", required=True)
    d.add_argument("--mode", action="append", choices=("eager", "graph", "compile", "regional"),
                   default=None)
    d.add_argument(
        "--allreduce",
        action="append",
        default=None,
        choices=("nccl", "symm-one-shot", "symm-two-shot", "symm-inductor"),
    )
    d.add_argument("--prompt-len", type=int, default=5)
    d.add_argument("--new-tokens", type=int, default=200)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--dtype", default="auto")
    d.add_argument("--attention", default="auto",
                   help="auto (triton on GPU, sdpa on CPU; earlier runs, before this option, used sdpa)")
    from llmopt.models.gemv_linear import CHOICES as DENSE_GEMV_CHOICES

    d.add_argument("--dense-gemv", default="auto", choices=("auto", *DENSE_GEMV_CHOICES),
                   help="compiled modes: which bf16 linears take llmopt's one-row kernel (as "
                        "llmopt bench; auto: o_proj and down_proj on one Hopper GPU, none under TP)")
    d.add_argument("--profile", default=None, metavar="DIR",
                   help="compiled modes: profile one more run per rank, top-kernels tables in DIR")
    for q in (a, d):
        q.add_argument("--tp", type=int, default=1)
        q.add_argument("--device", default="auto")
        q.add_argument("--out", default=None, help="JSON file (written by rank 0)")
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="+")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.cmd == "summary":
        print(summarize(args.files))
        return 0
    if args.tp > 1 and rank_env() is None:
        from llmopt.parallel.launch import launch_ranks

        return launch_ranks([sys.executable, "-m", "llmopt.parallel.tpbench", *argv], args.tp)
    if args.cmd == "allreduce" and args.tp < 2:
        print("allreduce needs --tp >= 2", file=sys.stderr)
        return 2
    tp = init_tp(args.tp, args.device) if args.tp > 1 else None
    t0 = time.perf_counter()

    def save(results: list[dict[str, Any]]) -> None:
        if args.out and (tp is None or tp.is_main):
            out = {
                "command": "python -m llmopt.parallel.tpbench " + " ".join(argv),
                "env": _env_info(),
                "seconds": round(time.perf_counter() - t0, 1),
                "results": results,
            }
            Path(args.out).write_text(json.dumps(out, indent=2))

    if args.cmd == "allreduce":
        assert tp is not None
        results = bench_allreduce(tp, args.numel or [4096], args.iters, args.graph_calls)
        bw = copy_bandwidth(tp.device)
        if bw is not None:
            for r in results:
                r["copy_tbps"] = round(bw, 3)
    else:
        args.mode = args.mode or ["graph"]
        args.allreduce = args.allreduce or ["nccl"]
        results = bench_decode(args, tp, save)
    save(results)
    if args.cmd == "allreduce" and tp.is_main:
        for r in results:
            print(_row(r))
    shutdown_tp(barrier=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
