"""``load_model``: a model spec in, a ready model and tokenizer out.

The model is built on the meta device and its parameters are assigned from the checkpoint's
(memory-mapped) tensors, so nothing is initialised twice and no second copy is made.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.config import ModelConfig
from llmopt.devices import resolve_device, resolve_dtype
from llmopt.errors import CheckpointError, UserError
from llmopt.loading.resolve import resolve_model
from llmopt.loading.tokenizer import Tokenizer
from llmopt.models import build_model

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    load_seconds: float
    quant: str | None = None  # the quantisation method of the weights, if any
    quant_config: dict[str, Any] | None = None  # its resolved settings (QuantConfig.to_dict())


def load_model(
    spec: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    seed: int = 0,
    quant: str | None = None,
) -> LoadedModel:
    """``quant``: a quantisation spec (``llmopt.quant.parse_quant_spec``) applied on the fly."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if spec.startswith("preset:"):
        from llmopt.loading.presets import preset_config

        config = preset_config(spec.split(":", 1)[1])
        model = random_model(config, dev, dt, seed)
        quant_config = None
        if quant:
            from llmopt.quant.api import quantize_loaded

            quant_config = quantize_loaded(model, quant, None, progress).to_dict()
        return LoadedModel(model, None, config, spec, dev, dt, True, time.perf_counter() - t0, quant, quant_config)
    path = resolve_model(spec, progress=progress)
    transform: Callable[[nn.Module], None] | None = None
    quant_config: dict[str, Any] | None = None
    if path.is_dir():
        config = ModelConfig.from_file(path / "config.json")
        tokenizer: Tokenizer | None = None
        if (path / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_dir(path)
        else:
            log.warning("%s has no tokenizer.json: token ids only", path)
        from llmopt.loading.safetensors_io import iter_safetensors

        tensors: Iterator[tuple[str, torch.Tensor]] = iter_safetensors(path)
        from llmopt.quant.checkpoint import load_plan

        plan = load_plan(path)  # quantised checkpoint: swap modules, convert its tensors
        if plan is not None:
            if quant:
                raise UserError(f"{path} is already quantised ({plan.config.method}); drop --quant")
            tensors, transform, quant = plan.wrap(tensors), plan.transform, plan.config.method
            quant_config = plan.config.to_dict()
    else:
        from llmopt.loading.gguf_io import iter_gguf_tensors, read_gguf

        reader, contents = read_gguf(path)
        config = contents.config
        tokenizer = Tokenizer.from_json(
            contents.tokenizer_json, contents.tokenizer_config, contents.generation_config
        )
        tensors = iter_gguf_tensors(reader, config)
    model = model_from_tensors(config, tensors, dev, dt, transform)
    if transform is not None:  # a quantised checkpoint: its modules repack for this device
        from llmopt.quant.api import prepare_for_device

        prepare_for_device(model)
    if quant and transform is None:
        from llmopt.quant.api import quantize_loaded

        quant_config = quantize_loaded(model, quant, tokenizer, progress).to_dict()
    return LoadedModel(model, tokenizer, config, str(path), dev, dt, False, time.perf_counter() - t0, quant,
                       quant_config)


def model_from_tensors(
    config: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    transform: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """``transform`` edits the meta model before tensors are assigned (quantised checkpoints
    swap in their modules, so the expected names, shapes and dtypes become theirs)."""
    with torch.device("meta"):
        model = build_model(config)
        if transform is not None:
            transform(model)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in expected:
            raise CheckpointError(f"checkpoint has an unexpected tensor {name!r}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
        # Float tensors take the model dtype; packed codes (integers, fp8) keep their own.
        cast = t.is_floating_point() and t.element_size() > 1
        state[name] = t.to(device=device, dtype=dtype if cast else t.dtype)
    missing = [n for n in expected if n not in state and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A model with normal(0, 0.02)-initialised weights built directly on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = build_model(config)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            # Scale so logits stay O(1) through deep stacks, like a trained model's.
            std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(p.shape[-1])
            t.normal_(0.0, std, generator=gen)
        state[name] = t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def save_checkpoint(model: nn.Module, tokenizer: Tokenizer | None, out_dir: Path) -> None:
    """Write a Hugging Face-style directory for ``model`` (float weights)."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config  # type: ignore[assignment]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(out_dir)
