"""Drafters: cheap guesses of the next few tokens, checked by the target in one forward pass.

Every drafter follows one protocol (``Drafter``). The driver calls ``start`` once per request,
then per step ``propose(ids, k)`` with the committed tokens (prompt, output, and the last emitted
token whose keys are not yet in the target's cache), and ``accept(n)`` with how many of the
proposed tokens the target kept. Model drafters keep their own static KV cache, written by
position: rolling back is forgetting how far the cache is valid, and tokens the draft has not seen
(the bonus token, or a backlog after steps without drafting) are fed next time: in one forward,
or, when the draft step is compiled and they are few, through that step one token at a time.
Self-drafts (``self-layers:N``, ``self-int8``, ``self-int4``) instead share the target's caches
(``SelfDrafter``), so they never have a backlog.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from llmopt.sampling.sampler import SamplingTensors
from llmopt.sampling.verify import probs_from_logits, sample_from_probs

# Feeds of at most this many tokens go through the compiled one-token draft step, token by token.
FEED_BY_STEP = 4


@dataclass
class Proposal:
    tokens: torch.Tensor  # [1, m] int64 on the device (m may be 0)
    num_tokens: int  # m, known on the host without a sync
    probs: torch.Tensor | None = None  # [1, m, V] the distributions drawn from; None = one-hot


class Drafter(Protocol):
    name: str
    # Cost of drafting one token relative to one plain target decode step (for adaptive k).
    cost_per_token: float

    def start(
        self,
        prompt_ids: list[int],
        max_seq_len: int,
        st: SamplingTensors,
        generator: torch.Generator | None,
    ) -> None: ...

    def propose(self, ids: list[int], k: int) -> Proposal: ...

    def accept(self, num_accepted: int) -> None: ...


def tokens_to_device(tokens: list[int], device: torch.device) -> torch.Tensor:
    """[1, m] int64 on ``device``; from pinned memory off-CPU, so the copy does not block."""
    t = torch.tensor([tokens], dtype=torch.long)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _empty(device: torch.device) -> Proposal:
    return Proposal(torch.zeros(1, 0, dtype=torch.long, device=device), 0, None)


# -- model drafters --------------------------------------------------------------------------------
class ModelDrafter:
    """Drafts with a (small) causal LM that shares the target's tokenizer, one token per forward.

    The k draft forwards feed each drafted token back as a device tensor: no host sync inside the
    draft loop. Greedy targets draft greedily; sampling targets draw from the draft's filtered
    distribution q (the same temperature/top-k/top-p as the target) and return q for verification.
    """

    def __init__(self, model: nn.Module, name: str, cost_per_token: float) -> None:
        self.model = model
        self.name = name
        self.cost_per_token = cost_per_token
        self.device = next(model.parameters()).device
        self.cached = 0  # positions [0, cached) of the draft's cache hold committed tokens
        self._base = 0  # position of the first token of the last proposal
        self._k = 0
        self._st: SamplingTensors | None = None
        self._gen: torch.Generator | None = None
        self._arange = torch.arange(0, device=self.device)
        self._step_graph = None

    def enable_compile(self, mode: str = "reduce-overhead") -> None:
        """Compile the one-token draft step (static shapes: it reads the whole static cache)."""
        from llmopt.engine.compile import compile_step

        self._step_graph = compile_step(self._step_static, self.model, mode, self.device)

    def _step_static(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, positions)[:, -1]  # [1, V]

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        if self._step_graph is not None:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
            return self._step_graph(tokens, positions)
        return self.model(tokens, positions, kv_len=kv_len)[:, -1]

    def start(
        self,
        prompt_ids: list[int],
        max_seq_len: int,
        st: SamplingTensors,
        generator: torch.Generator | None,
    ) -> None:
        self._setup_cache(max_seq_len)
        self._st, self._gen = st, generator
        # Host-indexed slices of one device arange give positions without a host->device copy.
        self._arange = torch.arange(max_seq_len + 1, device=self.device)
        self.cached = 0
        self._k = 0
        self._take_prompt(prompt_ids)

    def _setup_cache(self, max_seq_len: int) -> None:
        if self._step_graph is not None and self.model.max_seq_len not in (0, max_seq_len):
            self.model.clear_caches()  # the compiled step is specialised to one cache size
        self.model.setup_caches(1, max_seq_len)

    def _take_prompt(self, prompt_ids: list[int]) -> None:
        self._feed(prompt_ids, with_logits=False)

    def _feed(self, tokens: list[int], with_logits: bool = True) -> torch.Tensor | None:
        """Write ``tokens`` at positions cached.. into the cache; logits [1, V] of the last one."""
        n = len(tokens)
        start = self.cached
        inp = tokens_to_device(tokens, self.device)  # [1, n]
        positions = self._arange[start : start + n][None]  # [1, n]
        self.cached = start + n
        if with_logits and self._step_graph is not None and n <= FEED_BY_STEP:
            # The usual feed is 1 or 2 tokens (the last emitted one, after a full acceptance also
            # the last draft): the compiled one-token step, once per token, instead of an eager
            # forward, which at this size costs as much as many graph replays (launch-bound).
            for i in range(n):
                logits = self._step(inp[:, i : i + 1], positions[:, i : i + 1], start + i + 1)
            return logits
        if not with_logits:
            self.model.hidden_states(inp, positions, kv_len=start + n)
            return None
        logits = self.model(inp, positions, kv_len=start + n, logits_idx=self._arange[n - 1 : n])
        return logits[:, -1]  # [1, V]

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        st = self._st
        assert st is not None
        if st.all_greedy:
            return logits.argmax(dim=-1), None  # [1]
        q = probs_from_logits(logits[:, None], st)[:, 0]  # [1, V]
        return sample_from_probs(q, self._gen), q

    def propose(self, ids: list[int], k: int) -> Proposal:
        if k <= 0:
            return _empty(self.device)
        if self._k:  # a proposal nobody accepted: treat it as fully rejected
            self.accept(0)
        self.cached = min(self.cached, len(ids) - 1)  # always feed one token to get logits
        # Everything after the valid cache prefix: normally just the last emitted token; after a
        # fully accepted draft also the last draft token; after steps without drafting, a backlog.
        logits = self._feed(ids[self.cached :])
        assert logits is not None
        base = len(ids)  # position of the first drafted token
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            tok, q = self._pick(logits)  # [1], [1, V] | None
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if i == k - 1:
                break  # the last draft is not fed: the target may replace it
            pos = base + i
            logits = self._step(tok[:, None], self._arange[pos : pos + 1][None], pos + 1)  # [1, V]
        self._base, self._k = base, k
        return Proposal(
            torch.stack(tokens, dim=1),  # [1, k]
            k,
            torch.stack(probs, dim=1) if probs else None,  # [1, k, V]
        )

    def accept(self, num_accepted: int) -> None:
        if self._k == 0:
            return
        # Drafts 1..k-1 were written at base..base+k-2; only the accepted ones stay valid. Entries
        # beyond are stale but harmless: they are overwritten before any query can attend to them.
        self.cached = self._base + min(num_accepted, self._k - 1)
        self._k = 0


class SelfDrafter(ModelDrafter):
    """A self-draft that reads and writes the target's own KV caches, layer for layer, as
    LayerSkip does: the target's first N layers and its head (``self-layers:N``, from
    ``truncated_model``), or a quantised copy of the target (``self-int8``, ``self-int4``, from
    ``quantized_copy``).

    For ``self-layers`` the layers are the target's, fed the same tokens at the same positions,
    so the keys and values the target wrote at every committed position are exactly those the
    draft would compute. A quantised copy would compute them with its rounding; it reads the
    target's instead, which is what the target itself attends to. Either way the draft feeds only
    the pending token (the one whose keys the target has not written yet), whatever happened
    before: a draft after a run of plain steps costs no catch-up, and there is no second cache.
    What the draft writes at the pending and drafted positions is rewritten by the target's
    verify of the same positions before it is read as committed (the target writes a step's keys
    before its attention reads them). Its proposals stay the draft's own distribution q, so
    verification keeps the target's distribution."""

    def __init__(self, model: nn.Module, target: nn.Module, name: str, cost_per_token: float) -> None:
        super().__init__(model, name, cost_per_token)
        self.target = target

    def _setup_cache(self, max_seq_len: int) -> None:
        t = self.target
        if not t.has_cache or t.max_seq_len < max_seq_len:
            raise RuntimeError("the target's KV cache must be set up before the drafter starts")
        for mine, theirs in zip(self.model.model.layers, t.model.layers, strict=False):
            mine.self_attn.kv_cache = theirs.self_attn.kv_cache
        self.model.max_batch_size, self.model.max_seq_len = t.max_batch_size, t.max_seq_len
        self.model.rope_cos, self.model.rope_sin = t.rope_cos, t.rope_sin

    def _take_prompt(self, prompt_ids: list[int]) -> None:
        self.cached = len(prompt_ids)  # the target's prefill wrote them

    def propose(self, ids: list[int], k: int) -> Proposal:
        # The target has written every position but the pending token's (the last of ids).
        self._k = 0
        self.cached = len(ids) - 1
        return super().propose(ids, k)


def _detached_module_copy(module: nn.Module) -> nn.Module:
    """A new module object with its own child/parameter/buffer tables (tensors shared)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # type: ignore[assignment]
    clone._parameters = dict(module._parameters)  # type: ignore[assignment]
    clone._buffers = dict(module._buffers)  # type: ignore[assignment]
    return clone


def truncated_model(model: nn.Module, num_layers: int) -> nn.Module:
    """The target's first ``num_layers`` decoder layers with its final norm and head.

    Weights (whatever their module types, quantised ones included) are shared, not copied; the
    module tree is separate, so the truncated model holds its own KV cache attributes (which
    ``SelfDrafter`` points at the target's caches).
    """
    total = len(model.model.layers)
    if not 1 <= num_layers < total:
        from llmopt.errors import UserError

        raise UserError(f"self-layers:N needs 1 <= N < {total} (the target's layer count), got {num_layers}")
    draft = _detached_module_copy(model)
    inner = _detached_module_copy(model.model)
    layers = []
    for layer in list(model.model.layers)[:num_layers]:
        new_layer = _detached_module_copy(layer)
        attn = _detached_module_copy(layer.self_attn)
        attn.kv_cache = None
        new_layer.self_attn = attn
        layers.append(new_layer)
    inner.layers = nn.ModuleList(layers)
    draft.model = inner
    draft.config = model.config.replace(num_layers=num_layers)
    draft.max_seq_len = draft.max_batch_size = 0
    draft.rope_cos = None
    draft.rope_sin = None
    return draft


def quantized_copy(model: nn.Module, spec: str) -> nn.Module:
    """The target quantised by ``llmopt.quant`` (``spec`` e.g. "int4", "int4-g64", "int8") on a
    deep copy: the copy shares nothing mutable with the target, whose weights stay untouched."""
    from llmopt.errors import UserError

    try:
        from llmopt.quant.api import parse_quant_spec, quantize_
    except ImportError as e:
        raise UserError(f"self-{spec} drafts need the quantisation package (llmopt.quant): {e}") from None
    config = parse_quant_spec(spec)
    group = getattr(config, "group_size", None)
    smallest = min(m.in_features for m in model.modules() if isinstance(m, nn.Linear))
    if group is not None and "-g" not in spec and group > smallest:
        # Small models: the default group size may not fit; take the largest power of two that does.
        fit = 1 << (smallest.bit_length() - 1)
        config = parse_quant_spec(f"{spec}-g{fit}")
    draft = copy.deepcopy(model)
    draft.clear_caches()
    quantize_(draft, config)
    return draft


def model_cost(draft: nn.Module, target: nn.Module) -> float:
    """Draft step cost relative to the target's, estimated by bytes of weights read per step."""

    def size(m: nn.Module) -> int:
        seen: set[int] = set()
        total = 0
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) in seen or t.dim() == 0:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    # Embedding rows are gathered, not streamed: leave them out unless tied to the head.
    def streamed(m: nn.Module) -> int:
        emb = m.model.embed_tokens.weight
        tied = m.lm_head.weight is emb
        return size(m) - (0 if tied else emb.numel() * emb.element_size())

    return max(0.01, streamed(draft) / max(1, streamed(target)))


# -- model-free drafters ---------------------------------------------------------------------------
class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (longest n first)
    in prompt + output and propose what followed it. No model; plain Python on the host."""

    cost_per_token = 0.0

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.name = "ngram"
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.device = torch.device("cpu")
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def start(
        self,
        prompt_ids: list[int],
        max_seq_len: int,
        st: SamplingTensors,
        generator: torch.Generator | None,
    ) -> None:
        self.device = st.temperature.device
        self._index = {}
        self._indexed = 1

    def propose(self, ids: list[int], k: int) -> Proposal:
        length = len(ids)
        # Index n-grams ending before the last token (each has a continuation); later occurrences
        # overwrite earlier ones, so a lookup finds the latest.
        for end in range(self._indexed, length):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._index[tuple(ids[end - n : end])] = end
        self._indexed = max(self._indexed, length)
        if k <= 0:
            return _empty(self.device)
        for n in range(min(self.max_ngram, length), self.min_ngram - 1, -1):
            end = self._index.get(tuple(ids[length - n :]))
            if end is not None:
                cont = ids[end : end + k]
                return Proposal(tokens_to_device(cont, self.device), len(cont), None)
        return _empty(self.device)

    def accept(self, num_accepted: int) -> None:
        pass


class ReplayDrafter:
    """Benchmark only: proposes a given continuation (the target's own greedy output gives the
    ceiling: every draft accepted, at no drafting cost)."""

    cost_per_token = 0.0

    def __init__(self, continuation: list[int], name: str = "replay") -> None:
        self.name = name
        self.continuation = list(continuation)
        self.device = torch.device("cpu")
        self._prompt_len = 0

    def start(
        self,
        prompt_ids: list[int],
        max_seq_len: int,
        st: SamplingTensors,
        generator: torch.Generator | None,
    ) -> None:
        self.device = st.temperature.device
        self._prompt_len = len(prompt_ids)

    def _next(self, ids: list[int], k: int) -> list[int]:
        done = len(ids) - self._prompt_len  # output tokens so far, the pending one included
        return self.continuation[done : done + k]

    def propose(self, ids: list[int], k: int) -> Proposal:
        cont = self._next(ids, k) if k > 0 else []
        return Proposal(tokens_to_device(cont, self.device), len(cont), None)

    def accept(self, num_accepted: int) -> None:
        pass


class AlwaysWrongDrafter(ReplayDrafter):
    """Benchmark only: k tokens that differ from the given reference continuation (the target's
    greedy output), so greedy verification rejects every one: the floor of speculation."""

    def __init__(self, reference: list[int], vocab_size: int) -> None:
        super().__init__(reference, name="always-wrong")
        self.vocab_size = vocab_size

    def propose(self, ids: list[int], k: int) -> Proposal:
        if k <= 0:
            return _empty(self.device)
        ref = self._next(ids, k)
        ref += [ids[-1]] * (k - len(ref))  # past the reference: anything
        wrong = [(t + 1) % self.vocab_size for t in ref]
        return Proposal(tokens_to_device(wrong, self.device), k, None)
