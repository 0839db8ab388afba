"""Runs one scheduler step on the model: flat batch in, one sampled token per finished chunk out.

The model is the same ``LlamaForCausalLM`` as the latency path; the runner installs a paged KV
pool in each layer and the paged attention backend, and passes its own metadata through
``attn_meta``. On CUDA the paged attention is a Triton kernel, the pool is sized from the memory
left after a warm-up step, and decode-only steps replay CUDA graphs captured for batch buckets.
On other devices everything runs eagerly through the gather reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from llmopt.attention.paged import (
    PagedAttentionBackend,
    PagedAttentionMetadata,
    build_paged_metadata,
)
from llmopt.devices import new_cuda_graph
from llmopt.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from llmopt.kv_cache.paged import install_paged_caches, kv_bytes_per_block
from llmopt.sampling import SamplingParams, SamplingTensors, sample

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CPU_KV_BUDGET_BYTES = 256 << 20  # default pool on the CPU when --num-kv-blocks is not given
MAX_CPU_BLOCKS = 16384


@dataclass(frozen=True)
class RunnerConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from memory (GPU) or a default budget (CPU)
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, config: RunnerConfig,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.device = device
        self.config = config
        self.model_config = model.config  # type: ignore[attr-defined]
        dtype = kv_dtype or model.model.embed_tokens.weight.dtype  # type: ignore[union-attr]
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.bfloat16  # quantised embeddings: keep the cache in a float type
        self.kv_dtype = dtype
        self.block_size = config.block_size
        self.use_triton = device.type == "cuda"
        self.sliding_window = self.model_config.sliding_window
        model.attention = PagedAttentionBackend()  # type: ignore[assignment]
        model.init_rope(config.max_model_len, device)  # type: ignore[operator]
        self.table_width = -(-config.max_model_len // config.block_size)
        self.generators: dict[str, torch.Generator] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

        self.bytes_per_block = kv_bytes_per_block(
            self.model_config.num_layers, config.block_size,
            model.model.layers[0].self_attn.num_kv_heads,  # type: ignore[index]  # per rank under TP
            self.model_config.head_dim, dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif device.type == "cuda":
            num_blocks = self._blocks_from_gpu_memory()
        else:
            num_blocks = min(MAX_CPU_BLOCKS, max(CPU_KV_BUDGET_BYTES // self.bytes_per_block,
                                                 self.table_width))
        # More blocks than every sequence at full length could use only fill the prefix cache;
        # the cap keeps the block manager's plain-Python tables small for small models.
        if config.num_kv_blocks is None:
            num_blocks = min(num_blocks, 2 * config.max_num_seqs * self.table_width)
        self.num_blocks = num_blocks
        # One extra block past the manager's range takes the writes of padded graph rows.
        self.scratch_block = num_blocks
        install_paged_caches(model, num_blocks + 1, config.block_size, dtype, device)
        log.info("paged KV pool: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.block_size,
                 num_blocks * self.bytes_per_block / 2**30)
        if device.type == "cuda" and config.cuda_graphs:
            self._capture_graphs()

    # -- memory ------------------------------------------------------------------------------------
    def _blocks_from_gpu_memory(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the GPU after a full-size warm-up step."""
        cfg = self.config
        warm_blocks = -(-cfg.max_num_batched_tokens // cfg.block_size) + 1
        install_paged_caches(self.model, warm_blocks + 1, cfg.block_size, self.kv_dtype, self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_step(warm_blocks)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        for layer in self.model.model.layers:  # type: ignore[union-attr]
            layer.self_attn.kv_cache = None
        torch.cuda.empty_cache()
        available = int(total * cfg.gpu_memory_utilization) - peak - non_torch
        num_blocks = available // self.bytes_per_block
        if num_blocks < self.table_width:
            raise RuntimeError(
                f"only {max(available, 0) / 2**30:.2f} GiB left for the KV cache: not one sequence of "
                f"{cfg.max_model_len} tokens fits; raise --gpu-memory-utilization or lower --max-model-len")
        return int(num_blocks)

    @torch.inference_mode()
    def _dummy_step(self, num_blocks: int) -> None:
        """A step with the largest token count and the most sampled rows the scheduler allows."""
        cfg = self.config
        n = cfg.max_num_batched_tokens
        seqs = max(1, min(cfg.max_num_seqs, n))
        qlens = [n // seqs + (1 if i < n % seqs else 0) for i in range(seqs)]
        qlens = [q for q in qlens if q > 0]
        tables, next_block = [], 0
        for q in qlens:
            nb = -(-q // cfg.block_size)
            tables.append([(next_block + j) % num_blocks for j in range(nb)])
            next_block += nb
        meta = build_paged_metadata(qlens, [0] * len(qlens), tables, cfg.block_size, self.device,
                                    self.sliding_window, self.use_triton)
        ids = torch.zeros(1, sum(qlens), dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids, attn_meta=meta)  # type: ignore[operator]
        last = torch.cumsum(torch.tensor(qlens, device=self.device), 0) - 1
        logits = self.model.compute_logits(hidden[0, last])  # type: ignore[operator]
        st = SamplingTensors.from_params([SamplingParams(temperature=1.0, top_p=0.9)] * len(qlens),
                                         self.device)
        sample(logits, st)

    # -- CUDA graphs for decode --------------------------------------------------------------------
    def _capture_graphs(self) -> None:
        dev = self.device
        max_bs = min(self.config.max_num_seqs, GRAPH_BUCKETS[-1])
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max_bs]
        if self.buckets[-1] < max_bs:
            self.buckets.append(max_bs)
        top = self.buckets[-1]
        bs = self.block_size
        self.g_input = torch.zeros(1, top, dtype=torch.long, device=dev)
        self.g_positions = torch.zeros(1, top, dtype=torch.long, device=dev)
        self.g_slots = torch.full((top,), self.scratch_block * bs, dtype=torch.long, device=dev)
        self.g_tables = torch.full((top, self.table_width), self.scratch_block, dtype=torch.int32,
                                   device=dev)
        self.g_seq_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.g_qsl = torch.arange(top + 1, dtype=torch.int32, device=dev)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(self.buckets):  # largest first, so smaller ones reuse its pool
                meta = self._graph_meta(b)
                for _ in range(2):  # compile the kernels outside the capture
                    self._graph_body(b, meta)
                torch.cuda.synchronize(dev)
                graph = new_cuda_graph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._graph_body(b, meta)
                self.graphs[b] = (graph, out)
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _graph_meta(self, b: int) -> PagedAttentionMetadata:
        pos = self.g_positions[:, :b]
        return PagedAttentionMetadata(
            positions=pos, key_positions=pos, mask=None, kv_len=None,
            slot_mapping=self.g_slots[:b], block_tables=self.g_tables[:b],
            seq_lens=self.g_seq_lens[:b], query_start_loc=self.g_qsl[: b + 1],
            max_query_len=1, max_seq_len=self.config.max_model_len,
            sliding_window=self.sliding_window, use_triton=True,
        )

    def _graph_body(self, b: int, meta: PagedAttentionMetadata) -> torch.Tensor:
        hidden = self.model.hidden_states(self.g_input[:, :b], attn_meta=meta)  # type: ignore[operator]
        return self.model.compute_logits(hidden[0])  # type: ignore[operator]  # [b, V]

    def _run_graph(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        n = len(tokens)
        b = next(x for x in self.buckets if x >= n)
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        host_tables = torch.full((b, self.table_width), self.scratch_block, dtype=torch.int32)
        for i, t in enumerate(tables):
            host_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        pad = b - n
        self.g_input[0, :b].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.g_positions[0, :b].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.g_slots[:b].copy_(torch.tensor(slots + [self.scratch_block * bs] * pad), non_blocking=True)
        self.g_seq_lens[:b].copy_(torch.tensor([p + 1 for p in positions] + [1] * pad,
                                               dtype=torch.int32), non_blocking=True)
        self.g_tables[:b].copy_(host_tables, non_blocking=True)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    # -- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, sample: bool = True) -> ModelRunnerOutput:
        """Run one scheduled step. ``sample=False``: the forward only (a tensor-parallel worker
        rank, whose logits take part in the collectives but whose tokens nobody reads)."""
        for rid in sched.finished_req_ids:
            self.generators.pop(rid, None)
        seqs = sched.seqs
        if not seqs:
            return ModelRunnerOutput([], [])
        sampled = [s for s in seqs if s.sample]
        decode_only = all(len(s.token_ids) == 1 for s in seqs) and len(sampled) == len(seqs)
        if self.graphs and decode_only and len(seqs) <= self.buckets[-1]:
            logits = self._run_graph([s.token_ids[0] for s in seqs], [s.start_pos for s in seqs],
                                     [s.block_ids for s in seqs])  # [B, V]
        else:
            logits = self._run_eager(sched)
        if not sampled or not sample:
            return ModelRunnerOutput([], [])
        tokens = self._sample(logits, sampled)
        return ModelRunnerOutput([s.req_id for s in sampled], tokens)

    def _run_eager(self, sched: SchedulerOutput) -> torch.Tensor:
        seqs = sched.seqs
        qlens = [len(s.token_ids) for s in seqs]
        meta = build_paged_metadata(qlens, [s.start_pos for s in seqs], [s.block_ids for s in seqs],
                                    self.block_size, self.device, self.sliding_window, self.use_triton,
                                    self.table_width if self.use_triton else None)
        flat = [t for s in seqs for t in s.token_ids]
        ids = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)[None]  # [1, N]
        ends, acc = [], 0
        for s, q in zip(seqs, qlens, strict=True):
            acc += q
            if s.sample:
                ends.append(acc - 1)
        hidden = self.model.hidden_states(ids, attn_meta=meta)  # type: ignore[operator]  # [1, N, H]
        last = torch.tensor(ends, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden[0, last])  # type: ignore[operator]  # [B', V]

    def _sample(self, logits: torch.Tensor, seqs: list) -> list[int]:
        params = [s.params for s in seqs]
        st = SamplingTensors.from_params(params, self.device)
        gens: list[torch.Generator | None] | None = None
        if any(p.seed is not None and not p.greedy for p in params):
            gens = []
            for s in seqs:
                g = None
                if s.params.seed is not None and not s.params.greedy:
                    g = self.generators.get(s.req_id)
                    if g is None:
                        g = torch.Generator(device=self.device).manual_seed(s.params.seed)
                        self.generators[s.req_id] = g
                gens.append(g)
        seen = None
        if st.use_penalty:
            seen = torch.zeros(len(seqs), logits.shape[-1], dtype=torch.bool, device=self.device)
            for i, s in enumerate(seqs):
                known = s.all_token_ids[: s.start_pos + len(s.token_ids)]
                seen[i, torch.tensor(known, device=self.device)] = True
        return sample(logits, st, gens, seen).tolist()  # the one device->host copy per step
