"""One entry point, ``quantize_(model, config)``, and the registry of schemes by name.

Each scheme module (``int8``, ``int4``, ``nf4``, ``fp8``, ``gptq``, ``awq``) defines a frozen
config dataclass (a subclass of ``QuantConfig`` with ``method`` set) and a function
``quantize_model(model, config, calibration, progress)`` that swaps its ``nn.Linear`` modules for
quantised ones. Scheme modules are imported only when chosen.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from llmopt.errors import UserError

log = logging.getLogger(__name__)

# name -> module defining CONFIG (the dataclass) and quantize_model(...)
SCHEMES: dict[str, str] = {
    "int8": "llmopt.quant.int8",
    "int4": "llmopt.quant.int4",
    "nf4": "llmopt.quant.nf4",
    "fp8": "llmopt.quant.fp8",
    "gptq": "llmopt.quant.gptq",
    "awq": "llmopt.quant.awq",
}

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class QuantConfig:
    """Fields every scheme shares. A linear is left in float when a ``skip`` pattern matches its
    qualified name (fnmatch, or a plain substring: "lm_head" skips ``lm_head``)."""

    skip: tuple[str, ...] = DEFAULT_SKIP
    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def skips(self, name: str) -> bool:
        return any(p in name or fnmatch.fnmatchcase(name, p) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return {"method": self.method, **d}


def check_group_size(group_size: int, what: str = "group size") -> None:
    """Kernel tiles split K into power-of-two blocks that must not straddle two groups."""
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise UserError(f"{what} must be a power of two >= 16 (e.g. 32, 64, 128), got {group_size!r}")


def known_methods() -> list[str]:
    return list(SCHEMES)


def _scheme(name: str) -> Any:
    if name not in SCHEMES:
        raise UserError(f"unknown quantisation method {name!r}; known: {', '.join(SCHEMES)}")
    return importlib.import_module(SCHEMES[name])


def config_class(name: str) -> type[QuantConfig]:
    cls: type[QuantConfig] = _scheme(name).CONFIG
    return cls


def make_config(name: str, **overrides: Any) -> QuantConfig:
    """``make_config("int4", group_size=32)``; ``None`` overrides are ignored (CLI defaults)."""
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"method {name!r} has no option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(fields))}")
    if "skip" in overrides:
        overrides["skip"] = tuple(overrides["skip"])
    return cls(**overrides)


def parse_quant_spec(spec: str) -> QuantConfig:
    """``METHOD[:key=value,...]`` with shorthands ``-gN`` (group size) and ``-wB`` (bits):
    "int8", "int4-g32", "gptq-w3-g128", "nf4:double_quant=true", "fp8:mode=scaled_mm"."""
    spec = spec.strip()
    head, _, opts = spec.partition(":")
    parts = head.split("-")
    name, overrides = parts[0].lower(), {}
    cls = config_class(name)
    for p in parts[1:]:
        if p[:1] == "g" and p[1:].isdigit():
            overrides["group_size" if name != "nf4" else "block_size"] = int(p[1:])
        elif p[:1] == "w" and p[1:].isdigit():
            overrides["bits"] = int(p[1:])
        else:
            raise UserError(f"cannot parse {p!r} in quantisation spec {spec!r} (use e.g. int4-g64)")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise UserError(f"bad option {item!r} in {spec!r}; {name} takes: {', '.join(sorted(types))}")
        overrides[key] = _coerce(value.strip(), str(types[key]), spec)
    return make_config(name, **overrides)


def _coerce(value: str, type_name: str, spec: str) -> Any:
    try:
        if "bool" in type_name:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if "int" in type_name:
            return int(value)
        if "float" in type_name:
            return float(value)
        if "tuple" in type_name:
            return tuple(v for v in value.split("+") if v)
    except ValueError:
        raise UserError(f"bad value {value!r} in quantisation spec {spec!r}") from None
    return value


def quantize_(
    model: nn.Module,
    config: QuantConfig | str,
    calibration: torch.Tensor | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantise ``model`` in place (its ``nn.Linear`` modules are swapped) and return it.

    ``calibration`` [num_seqs, seq_len] token ids is needed by GPTQ and AWQ
    (``llmopt.quant.calibration.load_calibration`` makes it from a text file)."""
    if isinstance(config, str):
        config = parse_quant_spec(config)
    scheme = _scheme(config.method)
    if config.needs_calibration and calibration is None:
        raise UserError(f"{config.method} needs calibration data (token ids)")
    with torch.no_grad():
        scheme.quantize_model(model, config, calibration, progress)
    prepare_for_device(model)
    return model


def prepare_for_device(model: nn.Module) -> None:
    """Let each quantised module repack for the device it is on (a load-time transform, so the
    compiled forward never packs). Call again after moving the model to another device."""
    from llmopt.quant.linear import QuantLinear

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.prepare_for_device()


# -- helpers shared by the schemes ---------------------------------------------------------------
def quantizable_linears(model: nn.Module, config: QuantConfig) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and not config.skips(name):
            yield name, mod


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_linears(
    model: nn.Module,
    config: QuantConfig,
    make: Callable[[str, nn.Linear], nn.Module],
    progress: bool = False,
    desc: str = "quantising",
) -> int:
    """Replace each quantisable linear by ``make(name, linear)``; returns how many were swapped."""
    from tqdm import tqdm

    todo = list(quantizable_linears(model, config))
    for name, lin in tqdm(todo, desc=desc, disable=not progress, unit="linear"):
        set_submodule(model, name, make(name, lin))
    log.info("%s: %d linear layers quantised", config.method, len(todo))
    return len(todo)


def check_layers_fit(model: nn.Module, config: QuantConfig, group_size: int, multiple: int = 8) -> None:
    """Fail before any work when a layer cannot take this group size or packing."""
    for name, lin in quantizable_linears(model, config):
        k = lin.in_features
        if group_size > k:
            raise UserError(
                f"group size {group_size} is larger than layer {name} (in_features {k}); "
                f"use a group size <= {k}"
            )
        if k % multiple:
            raise UserError(f"layer {name} has in_features {k}, not a multiple of {multiple} (needed for packing)")


def quantize_loaded(
    model: nn.Module,
    spec: str | QuantConfig,
    tokenizer: Any | None,
    progress: bool = False,
    calib_path: str | None = None,
    calib_tokens: int | None = None,
    calib_seq_len: int | None = None,
) -> QuantConfig:
    """On-the-fly quantisation of a loaded model (``--quant``): calibrated methods read the
    packaged emma.txt unless told otherwise (random token ids when there is no tokenizer)."""
    config = parse_quant_spec(spec) if isinstance(spec, str) else spec
    calibration = None
    if config.needs_calibration:
        from llmopt.quant.calibration import (
            DEFAULT_CALIB_SEQ_LEN,
            DEFAULT_CALIB_TOKENS,
            load_calibration,
        )

        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        calibration = load_calibration(tokenizer, calib_path, calib_tokens or DEFAULT_CALIB_TOKENS,
                                       calib_seq_len or DEFAULT_CALIB_SEQ_LEN, vocab)
    quantize_(model, config, calibration, progress)
    return config
