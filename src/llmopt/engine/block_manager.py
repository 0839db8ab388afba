"""Paged KV block bookkeeping (plain Python): free list, reference counts, prefix caching.

Every full block of a request's known tokens is named by a hash chained over its prefix. A block
stays in the hash table after its last user frees it, so a later request with the same prefix
takes it back instead of recomputing; free blocks are reused least recently freed first, which
evicts the cached block that has gone unused the longest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from llmopt.engine.request import Request


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks in reuse order: the front is taken first (least recently freed).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.tables: dict[str, list[int]] = {}  # request id -> block ids
        self._num_registered: dict[str, int] = {}  # leading blocks of a request already hashed
        self.stats = PrefixCacheStats()

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Cached blocks that hold a prefix of ``req``'s tokens, and how many tokens they cover.

        At least one token is always left to compute, because its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        hashes = req.update_block_hashes(bs)
        limit = (req.num_tokens - 1) // bs
        hits: list[int] = []
        for i, h in enumerate(hashes[:limit]):
            b = self.cached.get(h)
            # The token check turns a (vanishingly rare) hash collision into a miss.
            if b is None or self.block_tokens[b] != tuple(req.all_token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(b)
        return hits, len(hits) * bs

    # -- allocation ------------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int, computed: Sequence[int] = ()) -> bool:
        table = self.tables.get(req.request_id, [])
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(table) - len(computed)
        revived = sum(1 for b in computed if self.ref_counts[b] == 0)  # leave the free list
        return need <= len(self.free) - revived

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: Sequence[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones (plus ``computed`` hit blocks
        for a newly admitted request). Returns False, changing nothing, when blocks run out."""
        if not self.can_allocate(req, num_new_tokens, computed):
            return False
        rid = req.request_id
        table = self.tables.setdefault(rid, [])
        if computed:
            self.stats.queried_tokens += req.num_tokens
            self.stats.hit_tokens += len(computed) * self.block_size
        elif not table and req.num_computed_tokens == 0:
            self.stats.queried_tokens += req.num_tokens
        for b in computed:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            table.append(b)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        for _ in range(self.blocks_needed(total) - len(table)):
            b, _ = self.free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            table.append(b)
        if self.enable_prefix_caching:
            self._register_full_blocks(req, total)
        return True

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None
            self.block_tokens[b] = None

    def _register_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Publish the request's full blocks up to ``num_tokens`` for reuse.

        Safe before the step runs: a request that hits such a block in this same step is in the
        same flat batch, and every layer writes all new keys before any attention reads them.
        """
        bs = self.block_size
        rid = req.request_id
        done = self._num_registered.get(rid, 0)
        full = min(num_tokens, req.num_tokens) // bs  # only blocks whose tokens are all known
        if full <= done:
            return
        hashes = req.update_block_hashes(bs)
        table = self.tables[rid]
        for i in range(done, full):
            b, h = table[i], hashes[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.cached[h] = b
                self.block_hash[b] = h
                self.block_tokens[b] = tuple(req.all_token_ids[i * bs:(i + 1) * bs])
        self._num_registered[rid] = full

    def free_request(self, req: Request) -> None:
        """Drop the request's references; blocks reaching zero return to the free list."""
        rid = req.request_id
        table = self.tables.pop(rid, [])
        self._num_registered.pop(rid, None)
        # Tail blocks first, so that a shared prefix outlives the suffixes in the LRU order.
        for b in reversed(table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    # Nothing to reuse in it: hand it out before any cached block.
                    self.free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> None:
        for b in list(self.free):
            self._evict(b)

    def check_invariants(self) -> None:
        """For tests: ref counts match the tables, and free blocks are exactly those unreferenced."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if counts[b] == 0}
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
