"""Weight-only quantisation: ``quantize_(model, config)`` with int8, int4, nf4, fp8, gptq, awq."""

from llmopt.quant.api import (
    DEFAULT_SKIP,
    SCHEMES,
    QuantConfig,
    known_methods,
    make_config,
    parse_quant_spec,
    quantize_,
)

__all__ = ["DEFAULT_SKIP", "SCHEMES", "QuantConfig", "known_methods", "make_config",
           "parse_quant_spec", "quantize_"]
