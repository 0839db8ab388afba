"""The tensor-parallel sharding plan, applied to a finished model or to its meta-device skeleton.

Megatron-style split of a Llama-family decoder over N ranks (model code never knows):
- ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` are column-parallel: each rank owns
  some output features (whole heads for attention) and needs no communication;
- ``o_proj``/``down_proj`` are row-parallel: each rank owns the matching input features and the
  partial outputs are summed by one all-reduce (a forward hook);
- ``model.embed_tokens`` is vocabulary-parallel (each rank looks up its rows, zeros elsewhere,
  all-reduce) and ``lm_head`` is vocabulary-parallel too (local logits, all-gather, trim pad).
Grouped-query attention is split by KV heads when they divide by N; otherwise each rank keeps
the KV heads its query heads read (some KV heads then live on several ranks).

A plan is pure data: for every state-dict tensor, which ranges of which axis this rank holds.
The same plan slices an in-memory model (``shard_model``) or reads only the needed bytes from
safetensors files (``parallel/loading.py``). Quantised linear modules shard the same way, along
whole quantisation groups, given their tensor layout (``register_layout`` or ``tp_layout()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.config import ModelConfig
from llmopt.errors import UserError
from llmopt.parallel.collectives import TPComm

log = logging.getLogger(__name__)

COLUMN_LEAVES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_LEAVES = ("o_proj", "down_proj")
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"

Ranges = tuple[tuple[int, int], ...]


# -- tensor layouts ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLayout:
    """Which axis of one module tensor indexes output features and which input features.

    ``out_block``/``in_block``: features per element along that axis (2 for int4 packed two per
    byte, the group size for per-group scales). None: the tensor does not vary along that kind of
    feature (a bias has no input axis; a per-output-channel scale has none either).
    """

    out_dim: int | None
    in_dim: int | None
    out_block: int = 1
    in_block: int = 1
    row_parallel: bool = True  # False: cannot be split by input feature (e.g. act-order perm)
    shardable: bool = True  # False: blocks cross both axes, the module cannot be split at all


LayoutFn = Callable[[nn.Module], dict[str, TensorLayout]]
_LAYOUTS: dict[type, LayoutFn] = {}


def register_layout(cls: type) -> Callable[[LayoutFn], LayoutFn]:
    """Declare how a (quantised) linear module's tensors shard; subclasses inherit it."""

    def deco(fn: LayoutFn) -> LayoutFn:
        _LAYOUTS[cls] = fn
        return fn

    return deco


@register_layout(nn.Linear)
def _linear_layout(m: nn.Module) -> dict[str, TensorLayout]:
    return {"weight": TensorLayout(0, 1), "bias": TensorLayout(0, None)}


@register_layout(nn.Embedding)
def _embedding_layout(m: nn.Module) -> dict[str, TensorLayout]:
    # Rows are vocabulary entries: the "output feature" axis of the vocabulary split.
    return {"weight": TensorLayout(0, None)}


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and persistent buffers (not its children's)."""
    out: dict[str, torch.Tensor] = {n: p for n, p in m._parameters.items() if p is not None}
    skip = m._non_persistent_buffers_set
    out.update({n: b for n, b in m._buffers.items() if b is not None and n not in skip})
    return out


def _infer_layout(m: nn.Module) -> dict[str, TensorLayout]:
    """Layout of a linear-like module of unknown type, from ``in_features``/``out_features``.

    The output axis is the one whose length is ``out_features``; the input axis is the longest
    other axis whose length divides ``in_features`` (in_features/2 for packed nibbles,
    in_features/group for group scales). A matrix where either axis cannot be found is refused
    rather than guessed: a wrong guess would give wrong logits, not an error.
    """
    out_f, in_f = int(m.out_features), int(m.in_features)  # type: ignore[arg-type]
    layouts: dict[str, TensorLayout] = {}
    for name, t in _own_tensors(m).items():
        shape = list(t.shape)
        out_dim = next((d for d, s in enumerate(shape) if s == out_f), None)
        candidates = [
            (s, d) for d, s in enumerate(shape) if d != out_dim and s > 1 and in_f % s == 0
        ]
        in_dim = max(candidates)[1] if candidates else None
        if t.dim() >= 2 and (out_dim is None or in_dim is None):
            raise UserError(
                f"cannot tell how to shard {type(m).__name__}.{name} of shape {tuple(shape)}: "
                "give the module a tp_layout() or register_layout() for its class"
            )
        in_block = in_f // shape[in_dim] if in_dim is not None else 1
        layouts[name] = TensorLayout(out_dim, in_dim, 1, in_block)
    return layouts


_QUANT_REGISTERED = False


def _register_quant_layouts() -> None:
    """Layouts of ``llmopt.quant`` modules, registered the first time one is met (so importing
    this module never imports the quantisation code)."""
    global _QUANT_REGISTERED
    _QUANT_REGISTERED = True
    try:
        from llmopt.quant import linear as ql
    except ImportError:
        return

    def per_channel(m: nn.Module) -> dict[str, TensorLayout]:
        # qweight [N, K]; scales [N]: one scale per output channel multiplies the partial sums.
        return {
            "qweight": TensorLayout(0, 1),
            "scales": TensorLayout(0, None),
            "bias": TensorLayout(0, None),
        }

    def packed_groups(m: nn.Module) -> dict[str, TensorLayout]:
        # qweight int32 [K/8, N] (8 codes per int along K); scales/zeros/absmax [K/group, N].
        group = int(getattr(m, "group_size", 0) or getattr(m, "block_size", 0))
        grouped = TensorLayout(1, 0, 1, group)
        return {
            "qweight": TensorLayout(1, 0, 1, 8),
            "scales": grouped,
            "zeros": grouped,
            "absmax": grouped,
            "absmax_codes": grouped,
            # Double-quantised absmax blocks run over the flattened [G, N] matrix.
            "absmax_scales": TensorLayout(None, None, shardable=False),
            "absmax_offset": TensorLayout(None, None),
            # act-order: x is gathered into sorted channel order, so a rank's input slice is
            # not a slice of the stored order; fine for column-parallel (input not split).
            "perm": TensorLayout(None, None, row_parallel=False),
            "bias": TensorLayout(0, None),
        }

    def int8(m: nn.Module) -> dict[str, TensorLayout]:
        # per channel, or group-wise: qweight [N, K] unpacked; scales/zeros [K/group, N]
        if not getattr(m, "group_size", 0):
            return per_channel(m)
        grouped = TensorLayout(1, 0, 1, int(m.group_size))
        return {"qweight": TensorLayout(0, 1), "scales": grouped, "zeros": grouped,
                "bias": TensorLayout(0, None)}

    for name, fn in (
        ("Int8Linear", int8),
        ("FP8Linear", per_channel),
        ("Int4Linear", packed_groups),
        ("NF4Linear", packed_groups),
    ):
        cls = getattr(ql, name, None)
        if cls is not None:
            _LAYOUTS.setdefault(cls, fn)


def module_layout(m: nn.Module) -> dict[str, TensorLayout]:
    tp_layout = getattr(m, "tp_layout", None)
    if callable(tp_layout):
        return dict(tp_layout())
    if not _QUANT_REGISTERED and type(m).__module__.startswith("llmopt.quant"):
        _register_quant_layouts()
    for cls in type(m).__mro__:
        if cls in _LAYOUTS:
            tensors = _own_tensors(m)
            return {n: lay for n, lay in _LAYOUTS[cls](m).items() if n in tensors}
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return _infer_layout(m)
    raise UserError(f"cannot shard a {type(m).__name__}: it declares no tensor layout")


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorShard:
    """This rank's part of one tensor: ``pieces`` of axis ``dim``, concatenated, zero-padded to
    ``size``. ``dim is None``: the whole tensor (replicated). ``zeros``: a tensor of the full
    shape holding zeros (a row-parallel bias lives on rank 0 only, so the all-reduce adds it once).
    """

    dim: int | None = None
    pieces: Ranges = ()
    size: int = 0
    zeros: bool = False

    def local_shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full_shape)
        shape = list(full_shape)
        shape[self.dim] = self.size
        return tuple(shape)


@dataclass(frozen=True)
class HeadSplit:
    """Global indices of the query and KV heads one rank holds, in local order."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]


@dataclass(frozen=True)
class ModuleShard:
    role: str  # column | row | vocab_embedding | vocab_head
    features: Ranges  # feature ranges this rank holds (output features, or input for row)
    size: int  # local feature count, padding included
    full: int  # the module's full feature count along the split


@dataclass
class ShardPlan:
    rank: int
    world_size: int
    vocab_size: int
    modules: dict[str, ModuleShard] = field(default_factory=dict)
    tensors: dict[str, TensorShard] = field(default_factory=dict)
    heads: dict[str, HeadSplit] = field(default_factory=dict)  # attention module -> heads


def split_heads(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> HeadSplit:
    if num_heads % world_size:
        raise UserError(
            f"the model has {num_heads} attention heads, which --tp {world_size} does not divide"
        )
    group = num_heads // num_kv_heads
    per_rank = num_heads // world_size
    q = tuple(range(rank * per_rank, (rank + 1) * per_rank))
    if num_kv_heads % world_size == 0:
        kv_per = num_kv_heads // world_size
        return HeadSplit(q, tuple(range(rank * kv_per, (rank + 1) * kv_per)))
    # Fewer KV heads than ranks (or not divisible): keep the ones these query heads read. The
    # attention backend pairs local query head j with local KV head j // (Hq_local / Hkv_local),
    # so the local list must be evenly grouped; repeating a KV head per query head always is.
    needed = [h // group for h in q]
    distinct = tuple(dict.fromkeys(needed))
    if per_rank % len(distinct) == 0:
        rep = per_rank // len(distinct)
        if needed == [kv for kv in distinct for _ in range(rep)]:
            return HeadSplit(q, distinct)
    return HeadSplit(q, tuple(needed))


def _merge(ranges: list[tuple[int, int]]) -> Ranges:
    """Join touching ranges (kept in order; repeats stay separate pieces)."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _heads_ranges(heads: tuple[int, ...], head_dim: int) -> Ranges:
    return _merge([(h * head_dim, (h + 1) * head_dim) for h in heads])


def _even(full: int, world_size: int, rank: int, what: str) -> Ranges:
    if full % world_size:
        raise UserError(f"the model's {what} ({full}) is not divisible by --tp {world_size}")
    n = full // world_size
    return ((rank * n, (rank + 1) * n),)


def validate_config(config: ModelConfig, world_size: int) -> None:
    """Raise a one-line ``UserError`` when ``config`` cannot be split ``world_size`` ways."""
    if world_size < 1:
        raise UserError(f"--tp must be >= 1, got {world_size}")
    if world_size == 1:
        return
    split_heads(config.num_heads, config.num_kv_heads, world_size, 0)
    _even(config.intermediate_size, world_size, 0, "intermediate size")


def _tensor_shard(
    module_name: str, tensor_name: str, layout: TensorLayout, ms: ModuleShard, rank: int
) -> TensorShard:
    column = ms.role in ("column", "vocab_embedding", "vocab_head")
    dim, block = (layout.out_dim, layout.out_block) if column else (layout.in_dim, layout.in_block)
    full_name = f"{module_name}.{tensor_name}"
    if not layout.shardable or (not column and not layout.row_parallel):
        raise UserError(
            f"cannot split {full_name} for tensor parallelism ({ms.role}-parallel): its layout "
            "does not divide by features (double-quantised or act-order weights)"
        )
    if dim is None:
        # Column: the tensor does not vary by output feature (a global scale): all of it.
        # Row: it varies by output feature only. A per-channel scale multiplies the partial sums
        # linearly, so every rank keeps it; an additive bias must be added once, by rank 0.
        if not column and tensor_name == "bias":
            return TensorShard(zeros=rank != 0)
        return TensorShard()
    for a, b in ms.features:
        if a % block or b % block:
            raise UserError(
                f"cannot split {full_name} for tensor parallelism: its {ms.role} features "
                f"[{a}, {b}) do not fall on whole blocks of {block} (quantisation group or packing)"
            )
    if ms.size % block:
        raise UserError(f"cannot split {full_name}: {ms.size} local features, blocks of {block}")
    pieces = tuple((a // block, b // block) for a, b in ms.features)
    return TensorShard(dim, pieces, ms.size // block)


def make_plan(model: nn.Module, world_size: int, rank: int) -> ShardPlan:
    """The plan for ``rank`` of ``world_size`` (the model may live on the meta device)."""
    if getattr(model, "tp_plan", None) is not None:
        raise UserError("this model is already split for tensor parallelism")
    config: ModelConfig = model.config  # type: ignore[assignment]
    validate_config(config, world_size)
    fused = [n for n, m in model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj"))]
    if fused:
        # A fused [q; k; v] matrix cannot be cut into whole heads by one range; fusing the
        # shards afterwards (models.fusion, as compiled decode does) gives the same speed.
        raise UserError(f"split the model before fusing its projections ({fused[0]} is fused)")
    hd = config.head_dim
    plan = ShardPlan(rank, world_size, config.vocab_size)
    state_names = list(model.state_dict(keep_vars=True).keys())
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if hasattr(m, "num_kv_heads") and hasattr(m, "q_proj"):
            plan.heads[name] = split_heads(m.num_heads, m.num_kv_heads, world_size, rank)
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        split = plan.heads.get(parent)
        ms: ModuleShard | None = None
        if leaf in ("q_proj", "o_proj") and split is not None:
            role = "column" if leaf == "q_proj" else "row"
            ms = ModuleShard(
                role,
                _heads_ranges(split.q_heads, hd),
                len(split.q_heads) * hd,
                config.num_heads * hd,
            )
        elif leaf in ("k_proj", "v_proj") and split is not None:
            ms = ModuleShard(
                "column",
                _heads_ranges(split.kv_heads, hd),
                len(split.kv_heads) * hd,
                config.num_kv_heads * hd,
            )
        elif leaf in ("gate_proj", "up_proj", "down_proj"):
            full = config.intermediate_size
            ranges = _even(full, world_size, rank, "intermediate size")
            ms = ModuleShard(
                "column" if leaf != "down_proj" else "row", ranges, full // world_size, full
            )
        elif name in (EMBEDDING, HEAD):
            v = config.vocab_size
            per = -(-v // world_size)  # padded so every rank holds the same number of rows
            lo, hi = min(rank * per, v), min((rank + 1) * per, v)
            role = "vocab_embedding" if name == EMBEDDING else "vocab_head"
            ms = ModuleShard(role, ((lo, hi),) if hi > lo else (), per, v)
            if name == EMBEDDING and not isinstance(m, nn.Embedding):
                ms = None  # an embedding of another kind stays whole
        if ms is None:
            continue
        plan.modules[name] = ms
        layouts = module_layout(m)
        unknown = sorted(set(_own_tensors(m)) - set(layouts))
        if unknown:
            raise UserError(
                f"cannot shard {name} ({type(m).__name__}): no layout for its tensor(s) {', '.join(unknown)}"
            )
        for tname, layout in layouts.items():
            plan.tensors[f"{name}.{tname}"] = _tensor_shard(name, tname, layout, ms, rank)
    for n in state_names:
        plan.tensors.setdefault(n, TensorShard())  # norms and anything else: replicated
    return plan


# -- slicing -------------------------------------------------------------------------------------
def take(source: Any, shard: TensorShard, full_shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's part of a tensor. ``source`` is a tensor or a safetensors slice (both accept
    a tuple of slices and return a tensor); only the selected ranges are read."""
    if shard.dim is None:
        t = (
            source
            if isinstance(source, torch.Tensor)
            else source[tuple(slice(None) for _ in full_shape)]
        )
        return torch.zeros_like(t) if shard.zeros else t
    lead = tuple(slice(None) for _ in range(shard.dim))
    parts = [source[(*lead, slice(a, b))] for a, b in shard.pieces]
    have = sum(b - a for a, b in shard.pieces)
    if have < shard.size:
        pad_shape = list(full_shape)
        pad_shape[shard.dim] = shard.size - have
        ref = parts[0] if parts else source[(*lead, slice(0, 0))]
        parts.append(torch.zeros(pad_shape, dtype=ref.dtype, device=ref.device))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)


# -- module transforms ---------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_end) of the embedding; ids elsewhere give zeros before the sum."""

    def __init__(self, vocab_start: int, vocab_end: int, comm: TPComm) -> None:
        super().__init__()
        self.vocab_start = vocab_start
        self.vocab_end = vocab_end
        self.comm = comm
        self.register_parameter("weight", None)  # [V_local (padded), H], assigned by the loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start  # [B, T]
        inside = (local >= 0) & (local < self.vocab_end - self.vocab_start)
        local = torch.where(inside, local, torch.zeros_like(local))
        out = F.embedding(local, self.weight)  # [B, T, H]
        out = out * inside.unsqueeze(-1).to(out.dtype)  # rows of other ranks contribute zeros
        return self.comm.all_reduce(out)


def _all_reduce_hook(
    comm: TPComm, module: nn.Module, inputs: Any, output: torch.Tensor
) -> torch.Tensor:
    return comm.all_reduce(output)


def _gather_logits_hook(
    comm: TPComm, vocab_size: int, module: nn.Module, inputs: Any, output: torch.Tensor
) -> torch.Tensor:
    return comm.all_gather_last(output)[..., :vocab_size]  # [..., V]: padding rows dropped


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    m = model.get_submodule(mod_name)
    if attr in m._buffers:
        m._buffers[attr] = t
    else:
        m._parameters[attr] = nn.Parameter(t, requires_grad=False)


def apply_transforms(model: nn.Module, plan: ShardPlan, comm: TPComm) -> None:
    """Everything but the tensors: local head counts, the vocab-parallel embedding, hooks."""
    if getattr(model, "tp_plan", None) is not None:
        raise UserError("this model is already split for tensor parallelism")
    model.tp_plan = plan  # for tools that need to know (weight bytes per rank, ...)
    for name, split in plan.heads.items():
        attn = model.get_submodule(name)
        attn.num_heads = len(split.q_heads)
        attn.num_kv_heads = len(split.kv_heads)
    if plan.world_size == 1:
        return
    for name, ms in plan.modules.items():
        m = model.get_submodule(name)
        if ms.role == "row":
            m.register_forward_hook(partial(_all_reduce_hook, comm))
        elif ms.role == "vocab_head":
            m.register_forward_hook(partial(_gather_logits_hook, comm, plan.vocab_size))
        elif ms.role == "vocab_embedding":
            lo, hi = ms.features[0] if ms.features else (0, 0)
            emb = VocabParallelEmbedding(lo, hi, comm)
            emb.weight = m.weight  # replaced by the local rows in assign_tensors
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, emb)
        if ms.role in ("column", "row", "vocab_head"):
            # Keep nn.Linear-style metadata truthful for anything that reads it later.
            feat = "out_features" if ms.role != "row" else "in_features"
            if hasattr(m, feat):
                setattr(m, feat, ms.size)


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        _set_tensor(model, name, t)
    config: ModelConfig = model.config  # type: ignore[assignment]
    if config.tie_word_embeddings:
        # Same rows on the same rank: the tie survives the split.
        model.lm_head.weight = model.model.embed_tokens.weight


def shard_model(model: nn.Module, comm: TPComm, device: torch.device | None = None) -> ShardPlan:
    """Split a finished model in place for ``comm.rank`` (quantised modules included)."""
    plan = make_plan(model, comm.world_size, comm.rank)
    if hasattr(model, "clear_caches"):
        model.clear_caches()  # caches were sized for the full head count
    state = model.state_dict(keep_vars=True)
    config: ModelConfig = model.config  # type: ignore[assignment]
    local: dict[str, torch.Tensor] = {}
    for name, shard in plan.tensors.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        full = state[name].detach()
        t = take(full, shard, tuple(full.shape)).to(device or full.device)
        if (
            shard.dim is not None
            and t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
        ):
            t = t.clone()  # a view would keep the whole tensor alive after the caller drops it
        local[name] = t
    apply_transforms(model, plan, comm)
    assign_tensors(model, local)
    from llmopt.quant.api import prepare_for_device

    prepare_for_device(model)  # quantised modules rebuild their device repacks from this shard
    return plan
