"""The ``/metrics`` page in the Prometheus text exposition format (written by hand: no dependency)."""

from __future__ import annotations

from llmopt.engine.llm_engine import EngineMetrics, Histogram


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _gauge(lines: list[str], name: str, help_: str, value: float, kind: str = "gauge") -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_fmt(value)}"]


def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    cum = 0
    for bound, count in zip(h.bounds, h.counts, strict=False):
        cum += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {cum}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum {_fmt(h.sum)}")
    lines.append(f"{name}_count {h.count}")


def render_metrics(stats: dict[str, float | int], m: EngineMetrics, model: str) -> str:
    lines: list[str] = []
    _gauge(lines, "llmopt_num_requests_running", "Requests in the running batch.", stats["running"])
    _gauge(lines, "llmopt_num_requests_waiting", "Requests waiting for admission.", stats["waiting"])
    _gauge(lines, "llmopt_kv_cache_blocks_used", "KV cache blocks referenced by requests.",
           stats["kv_blocks_used"])
    _gauge(lines, "llmopt_kv_cache_blocks_total", "KV cache blocks in the pool.", stats["kv_blocks_total"])
    _gauge(lines, "llmopt_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", stats["kv_usage"])
    _gauge(lines, "llmopt_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried.",
           stats["prefix_cache_hit_rate"])
    _gauge(lines, "llmopt_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
           stats["prefix_cache_queried_tokens"], "counter")
    _gauge(lines, "llmopt_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
           stats["prefix_cache_hit_tokens"], "counter")
    _gauge(lines, "llmopt_num_preemptions_total", "Requests preempted for lack of KV blocks.",
           stats["preemptions"], "counter")
    _gauge(lines, "llmopt_prompt_tokens_total", "Prompt tokens received.", m.prompt_tokens, "counter")
    _gauge(lines, "llmopt_generation_tokens_total", "Tokens generated.", m.generation_tokens, "counter")
    lines += ["# HELP llmopt_request_success_total Finished requests by finish reason.",
              "# TYPE llmopt_request_success_total counter"]
    for reason in ("stop", "length", "abort"):
        lines.append(f'llmopt_request_success_total{{finish_reason="{reason}"}} '
                     f"{m.requests_finished.get(reason, 0)}")
    _histogram(lines, "llmopt_time_to_first_token_seconds", "Time from arrival to the first token.", m.ttft)
    _histogram(lines, "llmopt_time_per_output_token_seconds",
               "Mean time per output token after the first, per request.", m.tpot)
    lines += ["# HELP llmopt_model_info The model being served.", "# TYPE llmopt_model_info gauge",
              f'llmopt_model_info{{model="{model}"}} 1']
    return "\n".join(lines) + "\n"
