"""``llmopt serve``: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from __future__ import annotations

import argparse
import logging

from llmopt.cli.common import add_model_args, progress_enabled
from llmopt.errors import UserError

log = logging.getLogger(__name__)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options shared by ``serve`` and ``bench-serve``."""
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: from GPU memory, or 256 MiB on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests per step (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget per step; longer prompts are prefilled in chunks (default 2048)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly on CUDA")


def engine_config_from_args(args: argparse.Namespace):  # -> EngineConfig
    from llmopt.engine.llm_engine import EngineConfig

    try:
        return EngineConfig(
            block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            enable_prefix_caching=not args.no_prefix_caching, cuda_graphs=not args.no_cuda_graphs)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_engine(args: argparse.Namespace):  # -> LLMEngine
    """The engine of this process. Under ``--tp`` (inside a rank: ``maybe_launch`` ran first)
    every rank builds one over its shard; rank 0's steps are broadcast to the others
    (``llmopt.parallel.serving``), which call ``serve_worker`` instead of serving."""
    from llmopt.engine.llm_engine import LLMEngine
    from llmopt.loading.loader import load_model

    cfg = engine_config_from_args(args)
    quant = getattr(args, "quant", None)
    make_runner = None
    if getattr(args, "tp", 1) > 1:
        from llmopt.parallel.loading import load_for_rank
        from llmopt.parallel.process_group import init_tp
        from llmopt.parallel.serving import make_tp_runner

        tp = init_tp(args.tp, args.device, getattr(args, "tp_allreduce", "auto"))
        lm = load_for_rank(args.model, tp, dtype=args.dtype, quant=quant,
                           progress=progress_enabled() and tp.is_main)
        make_runner = make_tp_runner(tp)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype,
                        progress=progress_enabled(), quant=quant)
    try:
        return LLMEngine(lm.model, lm.tokenizer, lm.device, cfg, make_runner=make_runner)
    except ValueError as e:
        raise UserError(str(e)) from None


def serve_worker(engine) -> bool:  # engine: LLMEngine
    """Under --tp on ranks other than 0: run rank 0's steps until it stops; True if this
    process was such a worker (and the caller should just return)."""
    from llmopt.parallel.process_group import current_tp

    tp = current_tp()
    if tp is None or tp.is_main:
        return False
    from llmopt.parallel.serving import run_worker

    run_worker(engine.runner, tp)
    return True


def stop_workers(engine) -> None:
    """Rank 0 under --tp: release the worker ranks (no-op otherwise)."""
    stop = getattr(engine.runner, "stop", None)
    if callable(stop):
        stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients must send (default: the --model value)")
    p.add_argument("--max-pending-requests", type=int, default=1024,
                   help="requests in flight beyond which new ones get 429 (default 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer prompts get 400 (default: the context length minus one)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let in-flight requests finish on shutdown (default 10)")
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError('serving needs FastAPI and uvicorn: pip install "llmopt[serve]"') from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    from llmopt.engine.llm_engine import AsyncLLMEngine
    from llmopt.server.app import ServerConfig, build_app

    try:
        scfg = ServerConfig(args.served_model_name or args.model, args.max_pending_requests,
                            args.max_prompt_tokens, args.shutdown_timeout)
    except ValueError as e:
        raise UserError(str(e)) from None
    from llmopt.parallel import maybe_launch

    rc = maybe_launch(args)
    if rc is not None:  # this process started the --tp ranks; they have finished
        return rc
    engine = build_engine(args)
    if serve_worker(engine):
        return 0
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, engine.tokenizer, scfg)
    tp_note = f", tensor parallel over {args.tp} ranks" if args.tp > 1 else ""
    print(f"serving {scfg.model_name} on http://{args.host}:{args.port}/v1 "
          f"({engine.runner.num_blocks} KV blocks of {engine.config.block_size} tokens{tp_note})",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=int(args.shutdown_timeout))
    finally:
        async_engine.shutdown()  # no step runs after this, so the workers can be released
        stop_workers(engine)
    return 0
