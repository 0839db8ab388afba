"""Issue 4: can a better per-channel scale lift int8's greedy agreement?

Screens scales for per-output-channel symmetric int8, round to nearest: absmax / 127 (what
``llmopt.quant.int8`` uses), and per channel the clip ratio in [0.5, 1] (60 steps) of the least
squared error. Measure: top-1 agreement with the float32 model on the first N tokens of the
packaged prideprejudice.txt, windows of 1024 with stride 512 as ``llmopt eval`` scores them.
Fake-quantised float32 weights; lm_head and the embedding left in float (the default skip).

    python bench/cpu/int8_scale_screen.py [N] [OUT.json]
"""

from __future__ import annotations

import sys
import time

import torch
from agreement_screen import Screen

from llmopt.loading.loader import load_model


def fake_quant(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scales[:, None]).clamp(-127, 127) * scales[:, None]


def absmax_scales(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax(1) / 127).clamp(min=1e-10)


def mse_scales(w: torch.Tensor, steps: int = 60, lowest: float = 0.5) -> torch.Tensor:
    amax = w.abs().amax(1)
    best = absmax_scales(w)
    best_err = ((fake_quant(w, best) - w) ** 2).sum(1)
    for r in torch.linspace(lowest, 1.0, steps):
        s = (amax * r / 127).clamp(min=1e-10)
        err = ((fake_quant(w, s) - w) ** 2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def main() -> int:
    n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    out = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m", device="cpu", dtype="float32", progress=False)
    model = lm.model
    screen = Screen(lm.tokenizer, n_tokens)
    screen.set_reference(model)
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    originals = {n: m.weight.detach().clone() for n, m in linears}
    for name, scales in (("absmax", absmax_scales), ("mse_clip", mse_scales)):
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, m in linears:
                m.weight.copy_(fake_quant(originals[n], scales(originals[n])))
        agreement = screen.agreement(model)
        err = sum(float(((m.weight - originals[n]) ** 2).sum()) for n, m in linears)
        screen.add(name, f", weights' squared error {err:.4e} ({time.perf_counter() - t0:.0f} s)",
                   agreement=agreement, weight_squared_error=err)
    screen.save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
