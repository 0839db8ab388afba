"""Memory-mapped reading of (sharded) safetensors checkpoints, with clear errors on bad files."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmopt.errors import CheckpointError

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "U16": 2, "U64": 8}


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def validate_safetensors(path: Path) -> None:
    """Check the header and that the file holds every byte the header promises."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            nbytes = numel * _DTYPE_SIZES.get(info["dtype"], 1)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt (bad entry for tensor {name!r})") from None
        if stop - start != nbytes and info["dtype"] in _DTYPE_SIZES:
            raise CheckpointError(f"{path} is corrupt (tensor {name!r} has the wrong byte size)")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: header promises {8 + n + end} bytes, file has {size}"
        )


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, memory-mapped (no copy)."""
    for path in shard_files(model_dir):
        validate_safetensors(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # the library's own error types differ between versions
            raise CheckpointError(f"cannot read {path}: {e}") from None
