"""Quality measurement: sliding-window perplexity, and agreement / KL against a reference."""

from llmopt.eval.perplexity import EvalConfig, EvalResult, default_corpus, evaluate, plan_windows

__all__ = ["EvalConfig", "EvalResult", "default_corpus", "evaluate", "plan_windows"]
