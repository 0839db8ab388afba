"""Shared by the quality screens (``int8_scale_screen.py``, ``gptq_w8_screen.py``): greedy top-1
choices on the first N tokens of the packaged prideprejudice.txt, windows of 1024 with stride
512 and BOS per window, as ``llmopt eval`` scores them, and the screen's JSON record."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from llmopt.eval import default_corpus
from llmopt.eval.perplexity import _logits, plan_windows


class Screen:
    def __init__(self, tokenizer: Any, n_tokens: int) -> None:
        self.tok = tokenizer
        text = default_corpus().read_text(encoding="utf-8")
        self.ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
        self.windows = plan_windows(len(self.ids), 1024, 512, True)
        self.reference: torch.Tensor | None = None
        self.record: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "variants": {}}

    def argmaxes(self, model: torch.nn.Module) -> torch.Tensor:
        picks = []
        with torch.inference_mode():
            for w in self.windows:
                x = torch.tensor([[self.tok.bos_token_id] + self.ids[w.begin:w.end]])
                idx = torch.arange(w.score_from - w.begin, w.end - w.begin)
                picks.append(_logits(model, x, idx).argmax(-1))
        return torch.cat(picks)

    def set_reference(self, model: torch.nn.Module) -> None:
        self.reference = self.argmaxes(model)
        self.record["tokens"] = len(self.reference)

    def agreement(self, model: torch.nn.Module) -> float:
        assert self.reference is not None, "set_reference first"
        return (self.argmaxes(model) == self.reference).float().mean().item()

    def add(self, name: str, line: str, **fields: Any) -> None:
        self.record["variants"][name] = fields
        print(f"{name}: agreement {100 * fields['agreement']:.2f}% over {self.record['tokens']} tokens{line}",
              flush=True)

    def save(self, out: str | None) -> None:
        if out:
            with open(out, "w") as f:
                json.dump(self.record, f, indent=2)
