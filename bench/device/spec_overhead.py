"""Where a speculative step's time goes beyond the target's forward (issue 8), compiled, on a
small launch-bound model (default: the default model's shape, random weights).

    python bench/device/spec_overhead.py --out DIR [--model preset:smollm2-135m]

Per case, milliseconds per target step and per emitted token: plain decoding; the free replay
drafter at k = 4 (every draft accepted: the verify step's whole cost); the always-rejected one at
k = 4 fixed and adaptive (the loop's cost when drafting fails). Bounds run on peaked logits
(bench/device/speculative.py's ``Peaked``) so that 1- and 5-token forwards agree on random
weights. Then a cProfile of one replay run and one adaptive always-rejected run, by own time:
the host work of the loop, with the wait for the device inside the host copy. Writes
DIR/spec_overhead.json and DIR/profile_*.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative import Peaked, _env  # noqa: E402  (bench/device/speculative.py)

from llmopt.engine.generate import Generator  # noqa: E402
from llmopt.loading.loader import load_model  # noqa: E402
from llmopt.sampling import SamplingParams  # noqa: E402
from llmopt.speculative import (  # noqa: E402
    AlwaysWrongDrafter,
    ReplayDrafter,
    SpeculativeConfig,
    SpeculativeGenerator,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="preset:smollm2-135m")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model, device="auto", dtype="bfloat16", progress=False)
    model, dev, vocab = lm.model, lm.device, lm.config.vocab_size
    prompt = [(t * 7 + 3) % vocab for t in range(5)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    peak = Peaked(model, vocab, True)
    res: dict[str, object] = {"command": "python " + " ".join(sys.argv), "model": args.model,
                              "new_tokens": args.new_tokens, "k": args.k, "env": _env(dev), "cases": {}}
    cases = res["cases"]
    assert isinstance(cases, dict)
    with peak:
        plain = Generator(model, None, dev, compile=True, compile_mode="regional")
        plain.warm_up([prompt], args.new_tokens)
        rates, ref = [], []
        for _ in range(args.runs + 1):
            o = plain.generate([prompt], params)[0]
            assert o.stats is not None
            rates.append(o.stats.decode_tokens_per_s)
            ref = o.token_ids
        plain_tps = statistics.median(rates[1:])  # the first run is one more warm-up
        cases["plain"] = {"tokens_per_s": round(plain_tps, 1), "ms_per_step": round(1000 / plain_tps, 3)}
        print(f"plain: {plain_tps:.1f} tok/s", flush=True)
        gens = {}
        for name, drafter, adaptive in (("replay k=4 fixed", ReplayDrafter(ref), False),
                                        ("always-wrong k=4 fixed", AlwaysWrongDrafter(ref, vocab), False),
                                        ("always-wrong adaptive", AlwaysWrongDrafter(ref, vocab), True)):
            cfg = SpeculativeConfig(k=args.k, adaptive=adaptive, compile=True, compile_mode="regional")
            gen = gens[name] = SpeculativeGenerator(model, None, dev, drafter, cfg)
            gen.warm_up([prompt], args.new_tokens)
            rates, s = [], None
            for _ in range(args.runs + 1):
                o = gen.generate([prompt], params)[0]
                assert o.stats is not None and gen.last_stats is not None
                rates.append(o.stats.decode_tokens_per_s)
                s = gen.last_stats
                equal = o.token_ids == ref
            tps = statistics.median(rates[1:])
            assert s is not None
            tokens_per_step = s.mean_tokens_per_step
            cases[name] = {"tokens_per_s": round(tps, 1), "speedup": round(tps / plain_tps, 3),
                           "tokens_per_step": round(tokens_per_step, 3),
                           "ms_per_step": round(1000 * tokens_per_step / tps, 3),
                           "steps_over_plain_step": round(tokens_per_step / tps * plain_tps, 3),
                           "k_histogram": {str(k): v for k, v in sorted(s.k_histogram.items())},
                           "same_tokens_as_plain": equal}
            print(f"{name}: {cases[name]}", flush=True)
        for name in ("replay k=4 fixed", "always-wrong adaptive"):
            prof = cProfile.Profile()
            prof.enable()
            gens[name].generate([prompt], params)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            (out / f"profile_{name.split()[0]}.txt").write_text(buf.getvalue())
            print(f"=== cProfile {name} (by own time)\n" + "\n".join(buf.getvalue().splitlines()[:45]), flush=True)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    (out / "spec_overhead.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
