"""Quantised checkpoints: writing them (atomically) and the load-time transform.

Two layouts, named by ``quantization_config.quant_method`` in config.json:

- ``"llmopt"`` (int8, int4, nf4, fp8): the quantised modules' own buffers, e.g.
  ``...q_proj.qweight`` int32 [K/8, N], ``...q_proj.scales`` [G, N], ``...q_proj.zeros`` [G, N].
- ``"gptq"`` / ``"awq"``: the Hugging Face layouts, readable by other tools and loadable here.
  GPTQ (AutoGPTQ "gptq" v1 format): ``qweight`` int32 [K*bits/32, N] packed along K,
  ``qzeros`` int32 [G, N*bits/32] packed along N holding zero-1, ``scales`` fp16 [G, N],
  ``g_idx`` int32 [K]. AWQ (AutoAWQ GEMM): ``qweight`` int32 [K, N/8] and ``qzeros`` int32
  [G, N/8] packed along N in the interleaved order 0,2,4,6,1,3,5,7, ``scales`` fp16 [G, N].
  Both are converted at load time into ``Int4Linear``'s layout. 8-bit GPTQ with one scale per
  output channel (``group_size`` -1, symmetric: every zero point 128) becomes ``Int8Linear``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.errors import CheckpointError, UserError
from llmopt.quant.api import (
    DEFAULT_SKIP,
    QuantConfig,
    make_config,
    quantizable_linears,
    set_submodule,
)
from llmopt.quant.kernels.reference import unpack_int4_kn
from llmopt.quant.linear import FP8Linear, Int4Linear, Int8Linear, NF4Linear
from llmopt.quant.primitives import (
    pack_awq,
    pack_bits,
    unpack_awq,
    unpack_bits,
)

log = logging.getLogger(__name__)


# -- quantization_config <-> QuantConfig ---------------------------------------------------------
def quantization_config_dict(config: QuantConfig) -> dict[str, Any]:
    c: Any = config
    if config.method == "gptq":
        return {
            "quant_method": "gptq", "bits": c.bits, "group_size": c.group_size or -1, "desc_act": c.act_order,
            "sym": c.sym, "damp_percent": c.damp, "true_sequential": False,
            "checkpoint_format": "gptq", "lm_head": not config.skips("lm_head"),
            "modules_to_not_convert": list(config.skip),
        }
    if config.method == "awq":
        return {
            "quant_method": "awq", "bits": 4, "group_size": c.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(config.skip),
        }
    return {"quant_method": "llmopt", **config.to_dict()}


def config_from_quantization_config(q: dict[str, Any]) -> QuantConfig:
    method = q.get("quant_method")
    try:
        if method == "llmopt":
            fields = {k: v for k, v in q.items() if k not in ("quant_method", "method")}
            return make_config(str(q["method"]), **fields)
        skip = tuple(DEFAULT_SKIP) + tuple(q.get("modules_to_not_convert") or ())
        if method == "gptq":
            if q.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
                raise CheckpointError(f"unsupported GPTQ checkpoint_format {q.get('checkpoint_format')!r}")
            if q.get("lm_head"):
                skip = tuple(s for s in skip if s != "lm_head")
            return make_config("gptq", bits=int(q.get("bits", 4)), group_size=int(q.get("group_size", 128)),
                               act_order=bool(q.get("desc_act", False)), sym=bool(q.get("sym", True)),
                               skip=tuple(dict.fromkeys(skip)))
        if method == "awq":
            if int(q.get("bits", 4)) != 4 or not q.get("zero_point", True):
                raise CheckpointError("only 4-bit AWQ with zero points is supported")
            if str(q.get("version", "gemm")).lower() != "gemm":
                raise CheckpointError(f"unsupported AWQ version {q.get('version')!r} (only gemm)")
            return make_config("awq", group_size=int(q.get("group_size", 128)), skip=tuple(dict.fromkeys(skip)))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise CheckpointError(f"bad quantization_config in config.json: {e}") from None
    raise CheckpointError(f"unsupported quantization method {method!r} in config.json (supported: llmopt, gptq, awq)")


# -- load-time transform ---------------------------------------------------------------------------
def empty_module(lin: nn.Linear, config: QuantConfig) -> nn.Module:
    """The quantised module for ``lin``'s shape, with placeholder buffers (built on meta)."""
    c: Any = config
    args = (lin.in_features, lin.out_features, lin.bias is not None)
    if config.method == "int8":
        return Int8Linear(*args, group_size=c.group_size)
    if config.method in ("int4", "awq"):
        return Int4Linear(*args, group_size=c.group_size)
    if config.method == "gptq":
        if c.bits == 8:
            return Int8Linear(*args)
        return Int4Linear(*args, group_size=c.group_size, bits=c.bits, act_order=c.act_order)
    if config.method == "nf4":
        return NF4Linear(*args, block_size=c.block_size, double_quant=c.double_quant,
                         dq_block_size=c.dq_block_size)
    if config.method == "fp8":
        return FP8Linear(*args, mode=c.mode)
    raise CheckpointError(f"no checkpoint layout for method {config.method!r}")


@dataclass
class LoadPlan:
    """What ``load_model`` does differently for a quantised checkpoint."""

    config: QuantConfig
    transform: Callable[[nn.Module], None]  # swaps modules on the meta model before assignment
    wrap: Callable[[Iterator[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]


def read_quantization_config(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_file reports these
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return q if isinstance(q, dict) else None


def load_plan(model_dir: Path) -> LoadPlan | None:
    """None for a float checkpoint."""
    q = read_quantization_config(model_dir)
    if q is None:
        return None
    config = config_from_quantization_config(q)
    v2 = q.get("checkpoint_format") == "gptq_v2"

    def transform(model: nn.Module) -> None:
        for name, lin in list(quantizable_linears(model, config)):
            set_submodule(model, name, empty_module(lin, config))

    def wrap(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        if config.method == "gptq":
            return _convert_hf(tensors, config, "gptq", v2)
        if config.method == "awq":
            return _convert_hf(tensors, config, "awq", False)
        return tensors

    return LoadPlan(config, transform, wrap)


_HF_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _convert_hf(tensors: Iterator[tuple[str, torch.Tensor]], config: QuantConfig, kind: str,
                v2: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF GPTQ/AWQ tensors -> Int4Linear buffers. Parts are collected until the end (they may be
    spread over shards), then converted module by module."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf in _HF_PARTS:
            parts.setdefault(prefix, {})[leaf] = t
        else:
            yield name, t
    for prefix, p in parts.items():
        need = ("qweight", "qzeros", "scales") + (("g_idx",) if kind == "gptq" and getattr(config, "act_order", False) else ())
        for leaf in need:
            if leaf not in p:
                raise CheckpointError(f"checkpoint lacks tensor {prefix}.{leaf}")
        if kind == "gptq":
            yield from _from_gptq(prefix, p, config, v2)
        else:
            yield from _from_awq(prefix, p)


def _from_gptq(prefix: str, p: dict[str, torch.Tensor], config: QuantConfig,
               v2: bool) -> Iterator[tuple[str, torch.Tensor]]:
    c: Any = config
    bits, gs = c.bits, c.group_size
    qweight, qzeros, scales = p["qweight"], p["qzeros"], p["scales"]
    k = qweight.shape[0] * 32 // bits
    codes = unpack_bits(qweight, bits)  # [K, N]
    zeros = unpack_bits(qzeros.t().contiguous(), bits).t().long()  # [G, N]
    if not v2:  # v1 stores zero - 1 (wrapping within the bit width)
        zeros = (zeros + 1) & (2**bits - 1)
    g_idx = p.get("g_idx")
    if bits == 8:  # per output channel, symmetric: Int8Linear's signed codes, scales [N]
        if scales.shape[0] != 1 or not bool((zeros == 128).all()):
            raise CheckpointError(f"{prefix}: 8-bit GPTQ loads only with one scale per output channel "
                                  "and zero point 128 (group_size -1, sym true)")
        if g_idx is not None and bool(g_idx.ne(0).any()):
            raise CheckpointError(f"{prefix}.g_idx names more than one group for a per-channel layer")
        yield f"{prefix}.qweight", (codes.t().to(torch.int16) - 128).to(torch.int8).contiguous()
        yield f"{prefix}.scales", scales[0]
        return
    trivial = torch.arange(k) // gs
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), trivial):
        if not c.act_order:
            raise CheckpointError(f"{prefix}.g_idx reorders channels but desc_act is false in config.json")
    if c.act_order:
        g = g_idx.long() if g_idx is not None else trivial
        perm = torch.argsort(g, stable=True)
        if not torch.equal(g[perm].cpu(), trivial):
            raise CheckpointError(f"{prefix}.g_idx does not give groups of {gs} channels")
        codes = codes[perm]
        yield f"{prefix}.perm", perm.to(torch.int32)
    yield f"{prefix}.qweight", pack_bits(codes, 4)
    yield f"{prefix}.scales", scales
    yield f"{prefix}.zeros", zeros.to(scales.dtype)


def _from_awq(prefix: str, p: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    codes = unpack_awq(p["qweight"])  # [K, N]
    zeros = unpack_awq(p["qzeros"])  # [G, N]
    yield f"{prefix}.qweight", pack_bits(codes, 4)
    yield f"{prefix}.scales", p["scales"]
    yield f"{prefix}.zeros", zeros.to(p["scales"].dtype)


# -- writing -----------------------------------------------------------------------------------------
def _hf_int8_tensors(name: str, m: Int8Linear) -> dict[str, torch.Tensor]:
    """8-bit per-channel GPTQ in AutoGPTQ's v1 layout: codes q + 128, every zero point 128 (stored
    as 127), one group (g_idx all 0)."""
    k, n = m.in_features, m.out_features
    codes = (m.qweight.t().to(torch.int16) + 128).contiguous()  # [K, N] in [1, 255]
    out = {
        "qweight": pack_bits(codes, 8),
        "qzeros": pack_bits(torch.full((n, 1), 127, dtype=torch.int16, device=codes.device), 8).t(),
        "g_idx": torch.zeros(k, dtype=torch.int32, device=codes.device),
        "scales": m.scales.to(torch.float16)[None, :],
    }
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return {f"{name}.{leaf}": t.contiguous() for leaf, t in out.items()}


def _hf_tensors(name: str, m: Int4Linear, config: QuantConfig) -> dict[str, torch.Tensor]:
    k, n, gs, bits = m.in_features, m.out_features, m.group_size, m.bits
    codes = unpack_int4_kn(m.qweight, k)  # [K, N] in stored (possibly permuted) order
    zeros = m.zeros.float().round().long()  # [G, N]
    scales = m.scales.to(torch.float16).contiguous()
    out: dict[str, torch.Tensor] = {}
    if config.method == "awq":
        out["qweight"] = pack_awq(codes)
        out["qzeros"] = pack_awq(zeros)
    else:
        g_idx = torch.arange(k, device=codes.device) // gs
        if m.perm is not None:  # stored channel j is model channel perm[j]
            perm = m.perm.long()
            orig = torch.empty_like(codes)
            orig[perm] = codes
            codes = orig
            g_new = torch.empty_like(g_idx)
            g_new[perm] = g_idx
            g_idx = g_new
        if bits == 3 and (k % 32 or n % 32):
            raise UserError(f"3-bit GPTQ packing needs in/out features divisible by 32 ({name}: {k}x{n})")
        out["qweight"] = pack_bits(codes, bits)
        out["qzeros"] = pack_bits(((zeros - 1) & (2**bits - 1)).t().contiguous(), bits).t().contiguous()
        out["g_idx"] = g_idx.to(torch.int32)
    out["scales"] = scales
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return {f"{name}.{leaf}": t.contiguous() for leaf, t in out.items()}


def checkpoint_tensors(model: nn.Module, config: QuantConfig) -> dict[str, torch.Tensor]:
    model_config = getattr(model, "config", None)
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    sd: dict[str, torch.Tensor] = {}
    hf = config.method in ("gptq", "awq")
    quant_prefixes = []
    if hf:
        for name, mod in model.named_modules():
            if isinstance(mod, Int4Linear):
                sd.update(_hf_tensors(name, mod, config))
                quant_prefixes.append(name + ".")
            elif isinstance(mod, Int8Linear) and config.method == "gptq":
                sd.update(_hf_int8_tensors(name, mod))
                quant_prefixes.append(name + ".")
    for k, v in model.state_dict().items():
        if hf and any(k.startswith(p) for p in quant_prefixes):
            continue
        if tied and k == "lm_head.weight":
            continue
        sd[k] = v.detach().contiguous()
    return sd


def save_quantized(model: nn.Module, tokenizer: Any | None, config: QuantConfig, out_dir: Path,
                   overwrite: bool = False) -> None:
    """Write safetensors + config.json (+ tokenizer) into a temporary sibling directory, then
    rename it into place, so an error leaves nothing half-written at ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tensors = {k: v.cpu() for k, v in checkpoint_tensors(model, config).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = model.config.to_hf_dict()  # type: ignore[union-attr,operator]
        hf_config["quantization_config"] = quantization_config_dict(config)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        # mkdtemp makes a private (0700) directory; give the result ordinary permissions
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
