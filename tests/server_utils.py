"""Start a live llmopt server (uvicorn on 127.0.0.1, a free port, in a thread) for tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import torch


@dataclass
class LiveServer:
    url: str
    engine: object  # AsyncLLMEngine
    server: object  # uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: torch.nn.Module, tokenizer, name: str = "test-model", num_kv_blocks: int = 256,
                 max_pending: int = 1024, max_num_seqs: int = 64, block_size: int = 16,
                 max_model_len: int | None = 512) -> LiveServer:
    import uvicorn

    from llmopt.engine.llm_engine import AsyncLLMEngine, EngineConfig, LLMEngine
    from llmopt.server.app import ServerConfig, build_app

    engine = LLMEngine(model, tokenizer, torch.device("cpu"), EngineConfig(
        num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, block_size=block_size,
        max_num_batched_tokens=256, max_model_len=max_model_len))
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, tokenizer, ServerConfig(name, max_pending_requests=max_pending,
                                                          shutdown_timeout_s=2.0))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", async_engine, server, thread)
