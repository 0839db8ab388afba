"""One Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2/2.5 and SmolLM2.

Parameter names follow Hugging Face (``model.layers.N.self_attn.q_proj.weight``) so checkpoints
load by table. The model never branches on quantisation or parallelism: those swap modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.attention import AttentionBackend, AttentionMetadata, get_backend
from llmopt.config import ModelConfig, rope_inv_freq
from llmopt.kv_cache import StaticKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D] in float32
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        # Set by models.fusion.fuse_projections: one matmul instead of three (fewer launches).
        self.qkv_proj: nn.Module | None = None
        self.kv_cache: StaticKVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if self.qkv_proj is not None:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)  # [B, Hq, T, D]
        k = apply_rotary(k, cos, sin)  # [B, Hkv, T, D]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(meta, k, v)  # [B, Hkv, S, D]
        out = backend(q, k, v, meta)  # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # set by models.fusion.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.attention: AttentionBackend = get_backend("sdpa")
        self.max_seq_len = 0
        self.max_batch_size = 0
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    # -- set-up (not on the hot path) -------------------------------------------------------
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_backend(self, name: str) -> None:
        from llmopt.attention.base import resolve_backend_name

        self.attention = get_backend(resolve_backend_name(name, self.model.norm.weight.device))

    def init_rope(self, max_seq_len: int, device: torch.device | str) -> None:
        """Rotary tables for positions [0, max_seq_len), computed in float64 then kept in float32."""
        inv_freq = torch.tensor(rope_inv_freq(self.config), dtype=torch.float64, device=device)
        t = torch.arange(max_seq_len, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        self.rope_cos = emb.cos().float()
        self.rope_sin = emb.sin().float()

    def _ensure_rope(self, length: int, device: torch.device) -> None:
        if self.rope_cos is None or self.rope_cos.device != device or self.rope_cos.shape[0] < length:
            self.init_rope(length, device)

    def setup_caches(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate static KV caches; reuses them when already large enough."""
        if max_seq_len <= self.max_seq_len and max_batch_size <= self.max_batch_size:
            return
        ref = self.model.norm.weight
        dtype = dtype or self.model.embed_tokens.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.bfloat16
        device = device or ref.device
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        c = self.config
        for layer in self.model.layers:
            # The module's own head count: a tensor-parallel rank holds only some KV heads.
            layer.self_attn.kv_cache = StaticKVCache(
                max_batch_size, max_seq_len, layer.self_attn.num_kv_heads, c.head_dim, dtype, device
            )
        self._ensure_rope(max_seq_len, torch.device(device))

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_seq_len = self.max_batch_size = 0

    @property
    def has_cache(self) -> bool:
        return self.model.layers[0].self_attn.kv_cache is not None

    # -- forward -----------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        attn_meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """Final hidden states (before the last norm) for ``input_ids`` [B, T] -> [B, T, H].

        positions: [B, T] absolute positions (default 0..T-1). With KV caches set up, keys and
        values are written at those positions and attention reads the first ``kv_len`` cache
        slots (default: all). ``attn_meta`` replaces all of that with metadata built by the
        caller for its own cache and backend (paged serving); then rotary tables must already
        cover every position (``init_rope``).
        """
        bsz, seq = input_ids.shape
        device = input_ids.device
        if attn_meta is None:
            if positions is None:
                positions = torch.arange(seq, device=device).expand(bsz, seq)
            if self.has_cache:
                key_positions = torch.arange(self.max_seq_len, device=device)  # [S]
            else:
                key_positions = positions  # [B, T]
                kv_len = None
            self._ensure_rope(self.max_seq_len if self.has_cache else seq, device)
            meta = self.attention.prepare(positions, key_positions, kv_len, self.config.sliding_window)
        else:
            meta = attn_meta
            positions = meta.positions
        cos = self.rope_cos[positions][:, None]  # [B, 1, T, D]
        sin = self.rope_sin[positions][:, None]
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta, self.attention)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        logits_idx: torch.Tensor | None = None,
        attn_meta: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; with ``logits_idx`` [B] only that token of each row: [B, 1, V]."""
        x = self.hidden_states(input_ids, positions, kv_len, attn_meta)
        if logits_idx is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logits_idx][:, None]  # [B, 1, H]
        return self.compute_logits(x)
