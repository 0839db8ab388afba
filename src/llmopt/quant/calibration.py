"""Calibration data for GPTQ and AWQ, and running a model one decoder layer at a time.

The layer-by-layer driver captures what enters the first decoder layer (hidden states plus the
rotary tables, attention metadata and backend the model passes along) with a forward pre-hook,
then calls each layer directly. It relies only on the model exposing ``model.layers`` and calling
each layer as ``layer(x, *rest)``, not on how rotary tables or masks are built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CALIB_TOKENS = 8192
DEFAULT_CALIB_SEQ_LEN = 512


def default_calibration_file() -> Path:
    """emma.txt shipped in the package: calibrate on it, never evaluate on it."""
    return Path(str(resources.files("llmopt") / "data" / "emma.txt"))


def load_calibration(
    tokenizer: Any | None,
    path: str | Path | None = None,
    num_tokens: int = DEFAULT_CALIB_TOKENS,
    seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    vocab_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids [num_tokens // seq_len, seq_len] from a text file (contiguous chunks).

    Without a tokenizer (random-weight presets) the ids are seeded random tokens: enough to
    exercise the algorithms and time them, meaningless for quality."""
    if num_tokens < seq_len:
        seq_len = num_tokens
    if num_tokens <= 0:
        raise UserError(f"--calib-tokens must be > 0, got {num_tokens}")
    n_seqs = num_tokens // seq_len
    if tokenizer is None and path is None:
        if vocab_size is None:
            raise UserError("calibration needs a tokenizer or a vocabulary size")
        log.warning("no tokenizer: calibrating on random token ids")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (n_seqs, seq_len), generator=g)
    path = Path(path) if path is not None else default_calibration_file()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"calibration file {path} not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"cannot read calibration file {path}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"calibration file {path} is empty")
    if tokenizer is None:
        raise UserError("--calib needs a model with a tokenizer")
    ids = tokenizer.encode(text, add_special_tokens=False)
    need = n_seqs * seq_len
    if len(ids) < need:
        raise UserError(
            f"calibration file {path} has {len(ids)} tokens; {need} are needed "
            f"(lower --calib-tokens or give a longer file)"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What enters a decoder layer, per calibration batch: hidden states and the other args."""

    hidden: list[torch.Tensor]  # each [b, T, H]
    rest: list[tuple[Any, ...]]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError("calibrated quantisation needs a decoder model with model.layers")
    return layers


def capture_first_layer_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured = LayerInputs([], [])

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        captured.hidden.append(args[0])
        captured.rest.append(tuple(args[1:]))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook)
    try:
        for i in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[i:i + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The layer's outputs on every batch, to feed the next layer."""
    out = [layer(x, *rest) for x, rest in zip(inputs.hidden, inputs.rest, strict=True)]
    return LayerInputs(out, inputs.rest)
