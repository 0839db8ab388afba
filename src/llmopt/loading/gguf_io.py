"""llama.cpp GGUF files: config, tokenizer and dequantised weights, read with the ``gguf`` package.

Weights come out under Hugging Face names. llama.cpp's converter permutes the rows of Q and K for
its interleaved rotary layout (architecture ``llama`` only); we undo that so the one model
implementation, which uses the half-split layout of Hugging Face, serves both sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmopt.config import ModelConfig
from llmopt.errors import CheckpointError, UserError

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K",
                         "Q5_K", "Q6_K", "Q8_K", "Q2_K", "Q3_K")

_ARCH_TO_HF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer regexes by llama.cpp's ``tokenizer.ggml.pre`` name.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFContents:
    config: ModelConfig
    tokenizer_json: dict[str, Any]
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    num_tensors: int


def _open(path: Path) -> Any:
    import gguf

    if not path.exists():
        raise UserError(f"model file {path} not found")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError...
        raise CheckpointError(f"{path} is not a valid GGUF file, truncated or corrupt ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (interleaved rotary -> half-split rotary)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_gguf(path: Path) -> tuple[Any, GGUFContents]:
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_TO_HF:
        raise UserError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(_ARCH_TO_HF))}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(f"{path}: GGUF rope frequency factors (rope_freqs) are not supported yet; "
                        "convert the Hugging Face checkpoint instead")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{path} has no tokenizer in its metadata")
    hidden = a("embedding_length")
    heads = a("attention.head_count")
    if hidden is None or heads is None or a("block_count") is None:
        raise CheckpointError(f"{path} lacks {arch}.embedding_length/block_count/attention.head_count")
    eps = float(a("attention.layer_norm_rms_epsilon", 1e-6))
    rope_type = a("rope.scaling.type", "none")
    hf: dict[str, Any] = {
        "architectures": [_ARCH_TO_HF[arch]],
        "vocab_size": int(a("vocab_size", len(tokens))),
        "hidden_size": int(hidden),
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("attention.key_length", int(hidden) // int(heads))),
        "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(f"{eps:.6g}"),  # stored as float32 in GGUF
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if rope_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor", 1.0))}
    elif rope_type not in ("none", None):
        raise UserError(f"{path}: GGUF rope scaling {rope_type!r} is not supported")
    config = ModelConfig.from_hf_dict(hf)
    tok_json, tok_cfg = _tokenizer(reader, path, tokens)
    gen_cfg = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    return reader, GGUFContents(config, tok_json, tok_cfg, gen_cfg, len(reader.tensors))


def iter_gguf_tensors(reader: Any, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, float32 tensor) for every tensor, dequantised."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    permute = config.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    for t in reader.tensors:
        name = _hf_name(t.name)
        qtype = Q(t.tensor_type)
        if qtype.name not in SUPPORTED_QUANT_TYPES:
            raise UserError(f"GGUF tensor {t.name} has unsupported type {qtype.name}; "
                            f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
        try:
            w = dequantize(t.data, qtype)
        except Exception as e:
            raise CheckpointError(f"cannot dequantise GGUF tensor {t.name}: {e}") from None
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = np.array(w, dtype=np.float32).reshape(shape)  # a writable copy, never a view of the file
        if permute and name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        elif permute and name.endswith(("q_proj.bias", "k_proj.bias")):
            n = config.num_heads if "q_proj" in name else config.num_kv_heads
            w = _unpermute(w, n)
        yield name, torch.from_numpy(np.ascontiguousarray(w))


def _hf_name(name: str) -> str:
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"unexpected GGUF tensor {name!r}")


def _tokenizer(reader: Any, path: Path, tokens: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{path}: GGUF tokenizer model {model!r} is not supported (supported: gpt2 BPE)")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if pre == "smollm":
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {**byte_level, "use_regex": True},
        ]}
    elif pre in ("gpt-2", "gpt2", "default", None):
        pre_tok = {**byte_level, "use_regex": True}
    else:
        regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
        if regex is None:
            raise UserError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported")
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]}
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, ty in enumerate(types) if ty in (3, 4)
    ]
    tok_json: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre in ("llama-bpe", "llama3"),
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }

    def tok(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos"),
        "eos_token": tok("eos"),
        "unk_token": tok("unknown"),
        "pad_token": tok("padding"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
    }
    return tok_json, tok_cfg
