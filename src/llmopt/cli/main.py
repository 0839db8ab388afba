"""``llmopt`` entry point: one module per subcommand, imported only when chosen."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from llmopt.errors import UserError

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("llmopt.cli.generate", "generate text from a prompt"),
    "convert": ("llmopt.cli.convert", "convert a GGUF file into a Hugging Face-style directory"),
    "bench": ("llmopt.cli.bench", "measure decode speed against the memory-bandwidth roofline"),
    "serve": ("llmopt.cli.serve", "serve an OpenAI-compatible HTTP API (continuous batching)"),
    "bench-serve": ("llmopt.cli.bench_serve", "serving benchmark: throughput, TTFT, TPOT"),
    "distill": ("llmopt.cli.distill", "train a small draft model on a teacher's logits"),
    "quantize": ("llmopt.cli.quantize", "write a quantised checkpoint (int8, int4, nf4, fp8, gptq, awq)"),
    "eval": ("llmopt.cli.eval", "perplexity, and agreement / KL against a reference model"),
}


class CLIError(UserError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line, exit 2 (as for any bad input).
        print(f"llmopt: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (fast start; one broken optional feature
    cannot take the others down)."""
    parser = _Parser(prog="llmopt", description="Fast LLM inference in pure PyTorch, measured.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        p.set_defaults(_module=module)
        if name in argv:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        chosen = next((a for a in argv if not a.startswith("-")), "")
        parser = build_parser([chosen] if chosen in SUBCOMMANDS else [])
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a usage error already printed as one line
            return e.code if isinstance(e.code, int) else 2
        args._argv = argv  # the tensor-parallel launcher re-runs this same command on each rank
        if args.version:
            from llmopt import __version__

            print(f"llmopt {__version__}")
            return 0
        if not args.command:
            parser.print_help()
            return 2
        rc = int(importlib.import_module(args._module).run(args) or 0)
        if rc == 0 and "llmopt.parallel.process_group" in sys.modules:
            # a tensor-parallel rank that finished cleanly: leave the group together with the others
            sys.modules["llmopt.parallel.process_group"].shutdown_tp(barrier=True)
        return rc
    except UserError as e:
        if debug:
            raise
        print(f"llmopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"llmopt: internal error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
