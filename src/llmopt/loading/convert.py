"""GGUF -> Hugging Face-style directory (config.json, model.safetensors, tokenizer files)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from llmopt.errors import UserError
from llmopt.loading.gguf_io import iter_gguf_tensors, read_gguf


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True, overwrite: bool = False) -> Path:
    """Write ``out_dir`` atomically: a half-written directory never appears under its name."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {out_dir} exists and is not empty (pass --overwrite)")
    reader, contents = read_gguf(gguf_path)
    tensors: dict[str, torch.Tensor] = {}
    it = iter_gguf_tensors(reader, contents.config)
    for name, t in tqdm(it, total=contents.num_tensors, desc=f"converting {gguf_path.name}",
                        unit="tensor", disable=not progress):
        tensors[name] = t
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(contents.config.to_hf_dict(), indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(contents.tokenizer_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(contents.tokenizer_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(contents.generation_config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
