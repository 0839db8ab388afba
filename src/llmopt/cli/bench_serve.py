"""``llmopt bench-serve``: a seeded serving workload, timed in-process or over HTTP.

Prompts are random token ids (so any model with the vocabulary works) with lengths drawn
uniformly or from a ShareGPT-like log-normal, optionally after a shared system prefix. Requests
arrive all at once (offline) or as a Poisson process at ``--request-rate``, at most
``--max-concurrency`` in flight. Reports output and total tokens/s, time to first token and
time per output token (p50, p99), and KV-cache usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from llmopt.cli.common import add_model_args
from llmopt.cli.serve import add_engine_args, build_engine, serve_worker, stop_workers
from llmopt.errors import UserError


@dataclass
class WorkItem:
    prompt_token_ids: list[int]
    output_len: int
    arrival_s: float  # offset from the start


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int
    start_s: float
    ttft_s: float | None = None
    end_s: float = 0.0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.start_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class BenchConfig:
    num_requests: int = 512
    dataset: str = "uniform"  # or "sharegpt"
    input_len_min: int = 64
    input_len_max: int = 512
    output_len_min: int = 256
    output_len_max: int = 256
    shared_prefix_len: int = 0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    vocab_size: int = 32000
    first_token_id: int = 10  # skip the special tokens at the start of most vocabularies


def make_workload(cfg: BenchConfig) -> list[WorkItem]:
    """The same seed gives the same prompts, lengths and arrival times."""
    rng = random.Random(cfg.seed)
    lo, hi = cfg.first_token_id, cfg.vocab_size - 1
    prefix = [rng.randint(lo, hi) for _ in range(cfg.shared_prefix_len)]
    items = []
    t = 0.0
    for _ in range(cfg.num_requests):
        if cfg.dataset == "sharegpt":
            # Log-normal fits of ShareGPT conversation turns (median ~150 in, ~200 out).
            n_in = int(min(max(rng.lognormvariate(5.0, 1.0), cfg.input_len_min), cfg.input_len_max))
            n_out = int(min(max(rng.lognormvariate(5.3, 0.8), cfg.output_len_min), cfg.output_len_max))
        else:
            n_in = rng.randint(cfg.input_len_min, cfg.input_len_max)
            n_out = rng.randint(cfg.output_len_min, cfg.output_len_max)
        prompt = prefix + [rng.randint(lo, hi) for _ in range(n_in)]
        if math.isfinite(cfg.request_rate):
            t += rng.expovariate(cfg.request_rate)
        items.append(WorkItem(prompt, n_out, t))
    return items


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def summarise(results: list[RequestResult], duration_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tpots = [t * 1000 for r in ok if (t := r.tpot_s) is not None]

    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration_s, 3),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "request_throughput": r3(len(ok) / duration_s if duration_s else 0.0),
        "output_tokens_per_s": r3(out_tok / duration_s if duration_s else 0.0),
        "total_tokens_per_s": r3((in_tok + out_tok) / duration_s if duration_s else 0.0),
        "ttft_ms": {"mean": r3(statistics.fmean(ttfts) if ttfts else None),
                    "p50": r3(_pct(ttfts, 0.5)), "p99": r3(_pct(ttfts, 0.99))},
        "tpot_ms": {"mean": r3(statistics.fmean(tpots) if tpots else None),
                    "p50": r3(_pct(tpots, 0.5)), "p99": r3(_pct(tpots, 0.99))},
        **extra,
    }


# -- in-process engine ------------------------------------------------------------------------------
def run_engine(engine: Any, items: list[WorkItem], cfg: BenchConfig, ignore_eos: bool = True,
               progress: bool = False) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Drive an ``LLMEngine`` directly: arrivals by the clock, one step at a time."""
    from llmopt.sampling import SamplingParams

    results: list[RequestResult] = [RequestResult(False, len(w.prompt_token_ids), 0, 0.0) for w in items]
    live: dict[str, int] = {}
    nxt = 0
    usage: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="bench-serve", unit="req", file=sys.stderr)
    t0 = time.perf_counter()
    done = 0
    while done < len(items):
        now = time.perf_counter() - t0
        while (nxt < len(items) and items[nxt].arrival_s <= now
               and (cfg.max_concurrency is None or len(live) < cfg.max_concurrency)):
            w = items[nxt]
            sp = SamplingParams(max_new_tokens=w.output_len, temperature=0.0, ignore_eos=ignore_eos)
            res = results[nxt]
            res.start_s = max(now, w.arrival_s) if math.isfinite(cfg.request_rate) else now
            try:
                rid = engine.add_request(w.prompt_token_ids, sp, arrival_time=t0 + res.start_s)
                live[rid] = nxt
            except UserError as e:
                res.error = str(e)
                done += 1
            nxt += 1
        if not engine.has_unfinished():
            if nxt < len(items):
                time.sleep(max(0.0, items[nxt].arrival_s - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        usage.append(engine.kv_usage())
        for o in outs:
            i = live.get(o.request_id)
            if i is None:
                continue
            res = results[i]
            if res.ttft_s is None and (o.new_token_ids or o.finished):
                res.ttft_s = t - res.start_s
            res.output_tokens = o.output_tokens
            if o.finished:
                res.ok, res.end_s = True, t
                del live[o.request_id]
                done += 1
                if bar is not None:
                    bar.update(1)
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    st = engine.stats()
    extra = {"kv_usage_max": round(max(usage, default=0.0), 4),
             "kv_usage_mean": round(statistics.fmean(usage) if usage else 0.0, 4),
             "prefix_cache_hit_rate": round(st["prefix_cache_hit_rate"], 4),
             "preemptions": st["preemptions"], "kv_blocks_total": st["kv_blocks_total"]}
    return results, duration, extra


# -- over HTTP ------------------------------------------------------------------------------------
async def _http_one(client: Any, url: str, model: str, w: WorkItem, res: RequestResult, t0: float,
                    ignore_eos: bool) -> None:
    body = {"model": model, "prompt": w.prompt_token_ids, "max_tokens": w.output_len,
            "temperature": 0.0, "stream": True, "ignore_eos": ignore_eos,
            "stream_options": {"include_usage": True}}
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                if obj.get("choices"):
                    if res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - t0 - res.start_s
                    chunks += 1
        res.end_s = time.perf_counter() - t0
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = True
    except Exception as e:  # a failed request is a result, not a crash of the benchmark
        res.error = f"{type(e).__name__}: {e}"


async def _run_http_async(url: str, model: str, items: list[WorkItem], cfg: BenchConfig,
                          ignore_eos: bool) -> tuple[list[RequestResult], float, dict[str, Any]]:
    import httpx

    results = [RequestResult(False, len(w.prompt_token_ids), 0, 0.0) for w in items]
    sem = asyncio.Semaphore(cfg.max_concurrency or len(items))
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(items))
    usage: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        stop = asyncio.Event()

        async def scrape() -> None:
            while not stop.is_set():
                try:
                    text = (await client.get(url + "/metrics")).text
                    m = re.search(r"^(?:llmopt_kv_cache_usage_ratio|vllm:\S*cache_usage\S*)\s+([0-9.eE+-]+)$", text, re.M)
                    if m:
                        usage.append(float(m.group(1)))
                except Exception:
                    pass
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass

        t0 = time.perf_counter()

        async def launch(i: int, w: WorkItem) -> None:
            await asyncio.sleep(max(0.0, w.arrival_s - (time.perf_counter() - t0)))
            async with sem:
                results[i].start_s = time.perf_counter() - t0
                await _http_one(client, url, model, w, results[i], t0, ignore_eos)

        scraper = asyncio.create_task(scrape())
        await asyncio.gather(*(launch(i, w) for i, w in enumerate(items)))
        duration = time.perf_counter() - t0
        stop.set()
        await scraper
    extra = {"kv_usage_max": round(max(usage), 4) if usage else None,
             "kv_usage_mean": round(statistics.fmean(usage), 4) if usage else None}
    return results, duration, extra


def _run_http_threads(url: str, model: str, items: list[WorkItem], cfg: BenchConfig,
                      ignore_eos: bool) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Fallback without httpx: urllib in a thread per in-flight request."""
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    results = [RequestResult(False, len(w.prompt_token_ids), 0, 0.0) for w in items]
    t0 = time.perf_counter()

    def one(i: int) -> None:
        w, res = items[i], results[i]
        time.sleep(max(0.0, w.arrival_s - (time.perf_counter() - t0)))
        res.start_s = time.perf_counter() - t0
        body = json.dumps({"model": model, "prompt": w.prompt_token_ids, "max_tokens": w.output_len,
                           "temperature": 0.0, "stream": True, "ignore_eos": ignore_eos,
                           "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        chunks, usage_tokens = 0, None
        try:
            with urllib.request.urlopen(req, timeout=3600) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if obj.get("usage"):
                        usage_tokens = obj["usage"].get("completion_tokens")
                    if obj.get("choices"):
                        if res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - t0 - res.start_s
                        chunks += 1
            res.end_s = time.perf_counter() - t0
            res.output_tokens = usage_tokens if usage_tokens is not None else chunks
            res.ok = True
        except (urllib.error.URLError, OSError, ValueError) as e:
            res.error = f"{type(e).__name__}: {e}"

    workers = min(cfg.max_concurrency or len(items), 512)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(items))))
    return results, time.perf_counter() - t0, {}


def run_http(url: str, model: str, items: list[WorkItem], cfg: BenchConfig,
             ignore_eos: bool = True) -> tuple[list[RequestResult], float, dict[str, Any]]:
    try:
        import httpx  # noqa: F401
    except ImportError:
        return _run_http_threads(url, model, items, cfg, ignore_eos)
    return asyncio.run(_run_http_async(url, model, items, cfg, ignore_eos))


# -- CLI -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--backend", choices=("engine", "http"), default="engine",
                   help="engine: load the model in-process; http: drive a running server (default engine)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (--backend http)")
    p.add_argument("--served-model-name", default=None, help="model name to send (default --model)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token-id range for prompts over HTTP (default 32000; in-process: the model's)")
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=512)
    w.add_argument("--dataset", choices=("uniform", "sharegpt"), default="uniform",
                   help="prompt/output lengths: uniform in the ranges, or ShareGPT-like log-normal")
    w.add_argument("--input-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    w.add_argument("--output-len", type=int, nargs=2, default=(256, 256), metavar=("MIN", "MAX"))
    w.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of a system prompt shared by every request (default 0)")
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once, offline)")
    w.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop at EOS (default: always produce the output length)")
    w.add_argument("--warmup-requests", type=int, default=4, help="untimed requests first (default 4)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    if args.num_requests < 1:
        raise UserError(f"--num-requests must be >= 1, got {args.num_requests}")
    if not (1 <= args.input_len[0] <= args.input_len[1]) or not (1 <= args.output_len[0] <= args.output_len[1]):
        raise UserError("--input-len and --output-len take MIN MAX with 1 <= MIN <= MAX")
    if args.request_rate <= 0:
        raise UserError(f"--request-rate must be > 0, got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UserError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    engine = None
    vocab = args.vocab_size or 32000
    if args.backend == "engine":
        from llmopt.parallel import maybe_launch

        rc = maybe_launch(args)
        if rc is not None:  # this process started the --tp ranks; they have finished
            return rc
        engine = build_engine(args)
        if serve_worker(engine):  # a --tp rank other than 0: it ran rank 0's steps
            return 0
        vocab = engine.model.config.vocab_size
    elif getattr(args, "tp", 1) > 1:
        raise UserError("--tp applies to --backend engine; an HTTP server takes it at `llmopt serve`")
    try:
        return _bench(args, engine, vocab)
    finally:
        if engine is not None:
            stop_workers(engine)


def _bench(args: argparse.Namespace, engine: Any, vocab: int) -> int:
    cfg = BenchConfig(args.num_requests, args.dataset, args.input_len[0], args.input_len[1],
                      args.output_len[0], args.output_len[1], args.shared_prefix_len, args.request_rate,
                      args.max_concurrency, args.seed, vocab)
    items = make_workload(cfg)
    ignore_eos = not args.no_ignore_eos
    model_name = args.served_model_name or args.model
    if args.warmup_requests > 0:
        wcfg = BenchConfig(**{**asdict(cfg), "num_requests": args.warmup_requests, "seed": cfg.seed + 1,
                              "request_rate": math.inf, "shared_prefix_len": 0,
                              "output_len_min": 8, "output_len_max": 8})
        warm = make_workload(wcfg)
        if engine is not None:
            run_engine(engine, warm, wcfg)
            engine.scheduler.block_manager.reset_prefix_cache()
            engine.scheduler.block_manager.stats.queried_tokens = 0
            engine.scheduler.block_manager.stats.hit_tokens = 0
        else:
            run_http(args.url, model_name, warm, wcfg)
    if engine is not None:
        results, duration, extra = run_engine(engine, items, cfg, ignore_eos, progress=sys.stderr.isatty())
    else:
        results, duration, extra = run_http(args.url, model_name, items, cfg, ignore_eos)
    summary = summarise(results, duration, extra)
    report = {"command": "llmopt " + " ".join(getattr(args, "_argv", []) or []),
              "backend": args.backend, "model": args.model, "workload": asdict(cfg) | {
                  "request_rate": None if math.isinf(cfg.request_rate) else cfg.request_rate},
              "engine": None if engine is None else asdict(engine.config), "results": summary}
    if engine is not None:
        report["tp"] = getattr(args, "tp", 1)
        report["device"] = str(engine.device)
        report["kv_blocks"] = engine.runner.num_blocks
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    s = summary
    print(f"requests {s['completed']} ok / {s['failed']} failed in {s['duration_s']:.1f} s")
    print(f"{'output tok/s':>14} {'total tok/s':>12} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9} {'KV max':>7}")

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    kv = s.get("kv_usage_max")
    print(f"{s['output_tokens_per_s']:>14.1f} {s['total_tokens_per_s']:>12.1f} "
          f"{ms(s['ttft_ms']['p50']):>9} {ms(s['ttft_ms']['p99']):>9} "
          f"{ms(s['tpot_ms']['p50']):>9} {ms(s['tpot_ms']['p99']):>9} "
          f"{'-' if kv is None else f'{kv:.0%}':>7}")
    if s["failed"]:
        print(f"errors: {s['errors']}", file=sys.stderr)
    return 0 if s["failed"] == 0 else 1

