"""Sharded loading: each rank builds the model skeleton on the meta device, applies the plan and
reads only its own slices of each tensor from the memory-mapped safetensors files, so a model
larger than one device (or than one host's share of memory) loads.

Random-weight presets are built sharded directly on each rank's device, with a per-rank seed.
GGUF checkpoints are dequantised whole on the CPU and then split (they are small models).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from llmopt.config import ModelConfig
from llmopt.devices import resolve_dtype
from llmopt.errors import CheckpointError
from llmopt.loading.loader import LoadedModel, load_model
from llmopt.loading.resolve import resolve_model
from llmopt.loading.safetensors_io import shard_files, validate_safetensors
from llmopt.loading.tokenizer import Tokenizer
from llmopt.models import build_model
from llmopt.parallel.collectives import TPComm
from llmopt.parallel.process_group import TPContext
from llmopt.parallel.sharding import (
    ShardPlan,
    apply_transforms,
    assign_tensors,
    make_plan,
    shard_model,
    take,
)

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class ShardedLoadedModel(LoadedModel):
    plan: ShardPlan | None = None
    comm: TPComm | None = None  # the collectives every hook of this model calls
    bytes_read: int = 0  # checkpoint bytes this rank read (after slicing, before dtype casts)
    rank: int = 0
    world_size: int = 1


def model_config_for(spec: str) -> ModelConfig:
    """The config of a model spec without reading its weights (for checks before launching)."""
    if spec.startswith("preset:"):
        from llmopt.loading.presets import preset_config

        return preset_config(spec.split(":", 1)[1])
    path = resolve_model(spec, progress=False)
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json")
    from llmopt.loading.gguf_io import read_gguf

    return read_gguf(path)[1].config


def make_comm(tp: TPContext) -> TPComm:
    return TPComm(tp.group, tp.rank, tp.world_size, tp.backend)


def _skeleton(config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(config)


def read_sharded_state(
    model_dir: Path,
    plan: ShardPlan,
    expected: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    tie_word_embeddings: bool,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's tensors from a safetensors checkpoint, and the bytes read for them."""
    state: dict[str, torch.Tensor] = {}
    nbytes = 0
    files = shard_files(model_dir)
    bar = tqdm(
        total=len(expected),
        desc=f"loading {plan.world_size}-way shard",
        unit="tensor",
        disable=not progress,
    )
    for path in files:
        validate_safetensors(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and tie_word_embeddings:
                        continue
                    if name not in expected:
                        raise CheckpointError(f"checkpoint has an unexpected tensor {name!r}")
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(
                            f"tensor {name!r} has shape {shape}, config.json implies {tuple(expected[name])}"
                        )
                    t = take(sl, plan.tensors[name], shape)  # reads only this rank's ranges
                    nbytes += t.numel() * t.element_size()
                    if t.is_floating_point():
                        t = t.to(dtype=dtype)
                    state[name] = t.to(device=device)
                    bar.update(1)
        except CheckpointError:
            raise
        except Exception as e:  # the library's own error types differ between versions
            raise CheckpointError(f"cannot read {path}: {e}") from None
    bar.close()
    missing = [
        n
        for n in expected
        if n not in state and not (n == "lm_head.weight" and tie_word_embeddings)
    ]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    return state, nbytes


def random_sharded_state(
    plan: ShardPlan,
    expected: dict[str, torch.Size],
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    tie_word_embeddings: bool,
) -> dict[str, torch.Tensor]:
    """normal(0, std)-initialised shards, made on ``device``: no rank ever holds a full tensor.

    Same init rule as ``loading.loader.random_model`` (std from the full fan-in), but each rank
    draws its own shard from its own seed, so a TP=N preset is a different random model than the
    TP=1 one (presets are for speed, not for comparing outputs).
    """
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + plan.rank)
    state: dict[str, torch.Tensor] = {}
    for name, full_shape in expected.items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        shard = plan.tensors[name]
        t = torch.empty(shard.local_shape(tuple(full_shape)), dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith("bias") or shard.zeros:
            t.zero_()
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(full_shape[-1])
            t.normal_(0.0, std, generator=gen)
        state[name] = t
    return state


def load_sharded(
    spec: str,
    tp: TPContext,
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    progress: bool = False,
) -> ShardedLoadedModel:
    """Load ``spec`` split over the group of ``tp``: this rank's part, on ``tp.device``."""
    t0 = time.perf_counter()
    dev = tp.device
    dt = resolve_dtype(dtype, dev)
    comm = make_comm(tp)
    tokenizer: Tokenizer | None = None
    nbytes = 0
    if spec.startswith("preset:"):
        config = model_config_for(spec)
        model = _skeleton(config)
        expected = {n: p.shape for n, p in model.state_dict(keep_vars=True).items()}
        plan = make_plan(model, tp.world_size, tp.rank)
        apply_transforms(model, plan, comm)
        state = random_sharded_state(plan, expected, dev, dt, seed, config.tie_word_embeddings)
        random_weights, source = True, spec
    else:
        path = resolve_model(spec, progress=progress)
        random_weights, source = False, str(path)
        if path.is_dir():
            config = ModelConfig.from_file(path / "config.json")
            tokenizer = Tokenizer.from_dir(path)
            model = _skeleton(config)
            expected = {n: p.shape for n, p in model.state_dict(keep_vars=True).items()}
            plan = make_plan(model, tp.world_size, tp.rank)
            apply_transforms(model, plan, comm)
            state, nbytes = read_sharded_state(
                path, plan, expected, dev, dt, config.tie_word_embeddings, progress
            )
        else:
            log.warning(
                "GGUF under --tp: every rank dequantises the whole file on the CPU, then splits"
            )
            full = load_model(str(path), device="cpu", dtype=dt, progress=progress)
            config, tokenizer, model = full.config, full.tokenizer, full.model
            plan = shard_model(model, comm, dev)
            state = {}
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assign_tensors(model, state)
    if state:  # checkpoints read shard by shard: repack for the device (shard_model does it too)
        from llmopt.quant.api import prepare_for_device

        prepare_for_device(model)
    model.eval().requires_grad_(False)
    return ShardedLoadedModel(
        model,
        tokenizer,
        config,
        source,
        dev,
        dt,
        random_weights,
        time.perf_counter() - t0,
        plan=plan,
        comm=comm,
        bytes_read=nbytes,
        rank=tp.rank,
        world_size=tp.world_size,
    )


def load_for_rank(
    spec: str,
    tp: TPContext,
    dtype: str | torch.dtype = "auto",
    quant: str | None = None,
    progress: bool = False,
) -> ShardedLoadedModel:
    """This rank's part of ``spec``, its all-reduce the one ``tp`` chose (``tp.allreduce``).
    Without ``quant``: ``load_sharded`` (sliced reads). With it: the whole model is loaded and
    quantised on this rank's device, then split along whole quantisation groups
    (``shard_model``), the same weights as quantising on one GPU; this needs the whole model to
    fit one device once."""
    if quant is None:
        shard = load_sharded(spec, tp, dtype=dtype, progress=progress)
    else:
        from dataclasses import fields

        from llmopt.parallel.sharding import shard_model

        lm = load_model(spec, device=tp.device, dtype=dtype, progress=progress, quant=quant)
        comm = make_comm(tp)
        plan = shard_model(lm.model, comm)
        base = {f.name: getattr(lm, f.name) for f in fields(LoadedModel)}
        shard = ShardedLoadedModel(**base, plan=plan, comm=comm, rank=tp.rank,
                                   world_size=tp.world_size)
    if tp.allreduce != "nccl":  # symmetric memory ("auto" was resolved for this rank's device)
        assert shard.comm is not None
        shard.comm.enable_symm_mem(tp.allreduce, shard.dtype, tp.device)
    return shard

