"""Sliding-window perplexity over a token stream, optionally against a reference model.

Windows of ``window`` tokens start every ``stride`` tokens; each scores only the tokens the
previous windows did not, so every token is scored exactly once and (after the first window)
with at least ``window - stride`` tokens of context. With a BOS token, each window is fed as
[BOS] + tokens, so its first token is scored too (conditioned on BOS alone in the first window).
With a reference model, the same windows give greedy top-1 agreement (how often both models'
most likely next token is the same) and the mean KL(reference || model) per scored token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def default_corpus() -> Path:
    """prideprejudice.txt shipped in the package (public domain): evaluate on it."""
    return Path(str(resources.files("llmopt") / "data" / "prideprejudice.txt"))


@dataclass(frozen=True)
class EvalConfig:
    window: int = 1024
    stride: int = 512
    max_tokens: int | None = 16384
    bos: bool = True

    def __post_init__(self) -> None:
        from llmopt.errors import UserError

        if self.window < 2:
            raise UserError(f"--window must be >= 2, got {self.window}")
        if not 0 < self.stride <= self.window:
            raise UserError(f"--stride must be in 1..window ({self.window}), got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise UserError(f"--max-tokens must be >= 2, got {self.max_tokens}")


@dataclass
class EvalResult:
    tokens_scored: int
    windows: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    seconds: float
    agreement: float | None = None  # fraction of scored tokens with the same greedy top-1
    kl: float | None = None  # mean KL(reference || model) per scored token (nats)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Window(NamedTuple):
    begin: int  # first token fed
    end: int  # one past the last token fed
    score_from: int  # first token scored (tokens [score_from, end) are scored)


def plan_windows(n_tokens: int, window: int, stride: int, bos: bool) -> list[Window]:
    out: list[Window] = []
    prev_end = 0 if bos else 1  # without BOS nothing predicts token 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        if end > prev_end:
            out.append(Window(begin, end, max(begin if bos else begin + 1, prev_end)))
            prev_end = end
        if end == n_tokens:
            break
    return out


def _logits(model: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Float32 logits [n, V] at input positions ``idx`` of x [1, L] (only those positions go
    through the head, which keeps memory at n x V)."""
    if hasattr(model, "hidden_states") and hasattr(model, "compute_logits"):
        h = model.hidden_states(x)  # [1, L, H]
        return model.compute_logits(h[:, idx])[0].float()
    return model(x)[0, idx].float()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    ids: list[int],
    config: EvalConfig,
    bos_token_id: int | None = None,
    reference: nn.Module | None = None,
    progress: bool = False,
) -> EvalResult:
    from tqdm import tqdm

    from llmopt.devices import synchronize
    from llmopt.errors import UserError

    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    bos = config.bos and bos_token_id is not None
    windows = plan_windows(len(ids), config.window, config.stride, bos)
    if not windows:
        raise UserError(f"the corpus has {len(ids)} token(s): too short to evaluate")
    device = next(model.parameters()).device
    nll = 0.0
    agree = 0
    kl = 0.0
    count = 0
    t0 = time.perf_counter()
    for w in tqdm(windows, desc="eval", disable=not progress, unit="window"):
        toks = ([bos_token_id] if bos else []) + ids[w.begin:w.end]
        x = torch.tensor([toks], device=device)  # [1, L]
        off = 1 if bos else 0
        # the logits at input position p predict the token at position p + 1
        idx = torch.arange(w.score_from - w.begin + off - 1, w.end - w.begin + off - 1, device=device)
        target = torch.tensor(ids[w.score_from:w.end], device=device)  # [n]
        logits = _logits(model, x, idx)  # [n, V]
        logp = F.log_softmax(logits, dim=-1)
        nll += float(-logp.gather(1, target[:, None]).sum())
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, x.to(next(reference.parameters()).device), idx), dim=-1)
            ref_logp = ref_logp.to(logp.device)
            agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        count += target.numel()
    synchronize(device)
    seconds = time.perf_counter() - t0
    mean_nll = nll / count
    return EvalResult(
        tokens_scored=count,
        windows=len(windows),
        nll=mean_nll,
        perplexity=math.exp(mean_nll),
        seconds=seconds,
        agreement=agree / count if reference is not None else None,
        kl=kl / count if reference is not None else None,
    )
