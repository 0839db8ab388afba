"""The latency path: static batch, static KV cache, prefill then token-by-token decode."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.devices import HostTokens, synchronize
from llmopt.engine.cuda_graph import CapturedStep
from llmopt.engine.outputs import GenerationStats, RequestOutput
from llmopt.errors import UserError
from llmopt.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from llmopt.sampling import SamplingParams, SamplingTensors, sample

# Callback for streamed text: (row index, text delta).
StreamCallback = Callable[[int, str], None]

CACHE_ROUND = 256  # KV caches grow in these steps so that nearby lengths reuse one allocation


@dataclass
class _Row:
    prompt_ids: list[int]
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of detok.text already streamed
    finished: bool = False
    finish_reason: str = "length"
    cut_at_stop: bool = False  # text was truncated at a stop string: nothing after it may appear
    text: str = ""


class Generator:
    """Static-batch generation. ``compile=True`` turns the decode step into one CUDA graph
    (torch.compile); the host then reads each step's tokens one step late, so the GPU never
    waits for the host."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        device: torch.device,
        compile: bool = False,
        compile_mode: str = "auto",
        max_seq_len: int | None = None,
        compile_prefill: bool = False,
        fuse_projections: bool | None = None,
        dense_gemv: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.config = model.config
        self.compiled = compile
        # A compiled graph is specialised to the cache shape: keep one fixed size.
        self.fixed_seq_len = (max_seq_len or 0) if compile else None
        self._decode_graph: Callable[..., torch.Tensor] | None = None
        self._prefill_fn = model
        self.compile_mode: str | None = None
        self.fused_projections = False  # q/k/v and gate/up joined (compiled models only)
        # Which plain linears take llmopt's one-row kernel. None: LLMOPT_DENSE_GEMV, whose "auto"
        # (default) is o_proj and down_proj in a model compiled on one Hopper GPU, where that
        # measured faster in bf16 (gemv_by_default), else none. Swapped before fusing, which
        # then joins the swapped modules as it does plain ones.
        from llmopt.models.gemv_linear import GemvLinear, dense_gemv_choice, use_gemv_linears

        self.dense_gemv = dense_gemv_choice(dense_gemv, model, device, compile)
        if self.dense_gemv != "none":
            use_gemv_linears(model, self.dense_gemv)  # a second generator of the model finds them swapped
        self.dense_gemv_modules = sum(type(m) is GemvLinear for m in model.modules())
        if compile:
            from llmopt.engine.compile import (
                CompiledLayers,
                compile_fn,
                compile_step,
                resolve_compile_mode,
            )
            from llmopt.models.fusion import fuse_by_default
            from llmopt.models.fusion import fuse_projections as fuse_fn

            compile_mode = self.compile_mode = resolve_compile_mode(compile_mode, device)
            # None: fused for weight-only quantised models on GPUs, where it measured faster;
            # bf16 stays unfused (measured slower; see fuse_by_default)
            if fuse_projections is None:
                fuse_projections = fuse_by_default(model, device)
            if fuse_projections:
                fuse_fn(model)
            self.fused_projections = bool(fuse_projections)
            if compile_mode == "regional":
                # One compiled layer serves all; the step (layers plus eager glue) is one CUDA
                # graph. Prefill runs the compiled layers only if asked (its first lengths each
                # compile, then one dynamic-length graph).
                self._decode_graph = compile_step(self._decode_static, model, compile_mode, device)
                if compile_prefill:
                    self._prefill_fn = CompiledLayers(model).wrap(model)
            else:
                self._decode_graph = compile_fn(self._decode_static, compile_mode, device=device, model=model)
                if compile_prefill:
                    # One graph for every prompt length (dynamic shapes); no CUDA graph, since the
                    # work per launch is large at prefill and lengths vary; no autotuning.
                    self._prefill_fn = compile_fn(model, "default", dynamic=True, device=device, model=model)

    def _decode_static(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # tokens, positions: [B, 1]; reads the whole static cache (the backend limits by length)
        return self.model(tokens, positions)[:, -1]  # [B, V]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode step: [B, 1] tokens at [B, 1] positions -> [B, V] logits."""
        if self._decode_graph is not None:
            return self._decode_graph(tokens, positions)
        return self.model(tokens, positions, kv_len=kv_len)[:, -1]

    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: give at least one token of text")
        longest = max(len(p) for p in prompts)
        ctx = self.max_context()
        if longest >= ctx:
            raise UserError(f"prompt is {longest} tokens, longer than the model's context of {ctx}")
        return min(longest + max_new_tokens, ctx)

    def cache_positions(self, total: int) -> int:
        """KV-cache positions a run of ``total`` tokens (prompt and new, ``_check_lengths``) needs."""
        return total

    def reserve(self, batch: int, positions: int) -> None:
        """Size the KV cache for ``batch`` rows of ``positions``. A compiled generator keeps at
        least that size from then on, so runs that fit reuse the graphs it has compiled."""
        self._ensure_cache(batch, positions)

    def warm_up(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Compile (and capture) on a few tokens what a run of ``max_new_tokens`` will use: the
        cache first takes that run's size, to which compiled graphs are specialised, so the
        run itself neither recompiles nor re-captures."""
        self.reserve(len(prompts), self.cache_positions(self._check_lengths(prompts, max_new_tokens)))
        self.generate(prompts, SamplingParams(max_new_tokens=min(3, max_new_tokens), temperature=0,
                                              ignore_eos=True))

    def _ensure_cache(self, batch: int, needed: int) -> None:
        size = min(-(-needed // CACHE_ROUND) * CACHE_ROUND, self.max_context())
        if self.fixed_seq_len is not None:
            # Growing the cache changes the graph's shapes: a recompile, so grow rarely.
            self.fixed_seq_len = size = max(self.fixed_seq_len, size)
            if self.model.max_seq_len != size or self.model.max_batch_size < batch:
                self.model.clear_caches()
                if isinstance(self._decode_graph, CapturedStep):
                    self._decode_graph.reset()  # its graphs wrote into the caches just freed
        self.model.setup_caches(batch, size)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stream: StreamCallback | None = None,
    ) -> list[RequestOutput]:
        t_start = time.perf_counter()
        total = self._check_lengths(prompts, params.max_new_tokens)
        bsz = len(prompts)
        lens = [len(p) for p in prompts]
        longest = max(lens)
        max_new = min(params.max_new_tokens, total - min(lens))
        self._ensure_cache(bsz, self.cache_positions(total))
        dev = self.device
        eos = frozenset() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        if not eos and not params.ignore_eos and self.config.eos_token_ids:
            eos = frozenset(self.config.eos_token_ids)
        rows = [
            _Row(p, IncrementalDetokenizer(self.tokenizer, p) if self.tokenizer else None)
            for p in prompts
        ]
        st = SamplingTensors.from_params([params] * bsz, dev)
        gens: list[torch.Generator | None] | None = None
        if params.seed is not None and not params.greedy:
            gens = [torch.Generator(device=dev).manual_seed(params.seed)]
        seen = None
        if st.use_penalty:
            seen = torch.zeros(bsz, self.config.vocab_size, dtype=torch.bool, device=dev)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor(p, device=dev)] = True

        # Right-padded prefill: every row writes its own positions; pads are masked, then overwritten.
        tokens = torch.zeros(bsz, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        tokens = tokens.to(dev)
        positions = torch.arange(longest, device=dev).expand(bsz, longest)
        lens_t = torch.tensor(lens, device=dev)
        logits = self._prefill_fn(tokens, positions, kv_len=longest, logits_idx=lens_t - 1)  # [B, 1, V]
        next_tok = sample(logits[:, -1], st, gens, seen)  # [B]
        cur_pos = lens_t.clone()  # [B] position the next token is written at
        host = next_tok.tolist()
        t_first = time.perf_counter()
        self._accept(rows, host, params, eos, stream)
        kv_len = longest
        pending: HostTokens | None = None
        for _ in range(max_new - 1):
            if all(r.finished for r in rows):
                break
            if seen is not None:
                seen[torch.arange(bsz, device=dev), next_tok] = True
            kv_len += 1
            logits = self.decode(next_tok[:, None], cur_pos[:, None], kv_len)  # [B, V]
            cur_pos += 1
            next_tok = sample(logits, st, gens, seen)
            # Read the previous step's tokens while this one runs on the device.
            if pending is not None:
                self._accept(rows, pending.get(), params, eos, stream)
            pending = HostTokens(next_tok)
        if pending is not None:
            self._accept(rows, pending.get(), params, eos, stream)
        synchronize(dev)
        for i, r in enumerate(rows):
            self._finish_text(i, r, stream)
        t_end = time.perf_counter()
        outs = []
        for r in rows:
            stats = GenerationStats(len(r.prompt_ids), len(r.token_ids), t_first - t_start,
                                    t_end - t_first, t_end - t_start)
            outs.append(RequestOutput(None, r.prompt_ids, r.text, r.token_ids, r.finish_reason, stats))
        return outs

    def _accept(
        self, rows: list[_Row], tokens: list[int], params: SamplingParams,
        eos: frozenset[int], stream: StreamCallback | None,
    ) -> None:
        for i, (r, t) in enumerate(zip(rows, tokens, strict=True)):
            if r.finished:
                continue
            if t in eos:
                r.finished, r.finish_reason = True, "stop"
                continue
            r.token_ids.append(t)
            if r.detok is not None:
                r.detok.add(t)
                if params.stop and self._hit_stop(r, params.stop):
                    r.finished, r.finish_reason = True, "stop"
                    continue
                # Hold back text that could still become a stop string.
                hold = max((len(s) - 1 for s in params.stop), default=0)
                upto = max(len(r.detok.text) - hold, r.emitted)
                if stream is not None and upto > r.emitted:
                    stream(i, r.detok.text[r.emitted:upto])
                r.emitted = upto
            if len(r.token_ids) >= params.max_new_tokens:
                r.finished, r.finish_reason = True, "length"

    @staticmethod
    def _hit_stop(r: _Row, stops: tuple[str, ...]) -> bool:
        assert r.detok is not None
        text = r.detok.text
        # Only the tail can hold a newly completed stop string.
        window = max(len(s) for s in stops) + 16
        start = max(0, min(r.emitted, len(text) - window))
        cut = min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)
        if cut < 0:
            return False
        r.detok.text = text[:cut]
        r.cut_at_stop = True
        return True

    def _finish_text(self, i: int, r: _Row, stream: StreamCallback | None) -> None:
        if r.detok is None:
            return
        if not r.cut_at_stop:
            r.detok.flush()
        r.text = r.detok.text
        if stream is not None and len(r.text) > r.emitted:
            stream(i, r.text[r.emitted:])
        r.emitted = len(r.text)
