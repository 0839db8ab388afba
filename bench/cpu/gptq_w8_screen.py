"""Issue 4: 8-bit per-channel GPTQ (``gptq-w8``) against round-to-nearest int8, by greedy
agreement with the float32 model on the first N tokens of the packaged prideprejudice.txt
(windows of 1024, stride 512, as ``llmopt eval`` scores them); calibration on the packaged
emma.txt (8,192 tokens, the default). The full-corpus numbers come from ``llmopt eval``
(bench/results/quality/gptq-w8.json); this screen chose the defaults (act-order on).

    python bench/cpu/gptq_w8_screen.py [N] [OUT.json] [SPEC ...]
"""

from __future__ import annotations

import sys
import time

import torch
from agreement_screen import Screen

from llmopt.loading.loader import load_model
from llmopt.quant.api import quantize_loaded

SPECS = ["int8", "gptq-w8:act_order=false", "gptq-w8", "gptq-w8:damp=0.1"]


def main() -> int:
    n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    out = sys.argv[2] if len(sys.argv) > 2 else None
    specs = sys.argv[3:] or SPECS
    torch.set_num_threads(2)

    def load():  # type: ignore[no-untyped-def]
        return load_model("smollm2-135m", device="cpu", dtype="float32", progress=False)

    lm = load()
    screen = Screen(lm.tokenizer, n_tokens)
    screen.set_reference(lm.model)
    for spec in specs:
        t0 = time.perf_counter()
        q = load()
        config = quantize_loaded(q.model, spec, q.tokenizer)
        quant_s = time.perf_counter() - t0
        screen.add(spec, f" (quantised in {quant_s:.0f} s)", agreement=screen.agreement(q.model),
                   config=config.to_dict(), quantise_s=round(quant_s, 1))
    screen.save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
