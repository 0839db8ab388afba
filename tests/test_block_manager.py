"""Block manager: allocation, reference counts, prefix hits, LRU eviction, no leaks (no model)."""

from __future__ import annotations

import random

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.request import Request
from llmopt.sampling.params import SamplingParams


def _req(rid: str, tokens: list[int], max_new: int = 8) -> Request:
    return Request(rid, tokens, SamplingParams(max_new_tokens=max_new, temperature=0))


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    r = _req("a", list(range(10)))
    assert bm.allocate_slots(r, 10)
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 7
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(bm.block_table("a")) == 3
    r.num_computed_tokens = 12
    assert bm.allocate_slots(r, 1)
    assert len(bm.block_table("a")) == 4
    bm.check_invariants()
    bm.free_request(r)
    assert bm.num_free_blocks == 10 and bm.tables == {}
    bm.check_invariants()


def test_allocation_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = _req("a", list(range(8))), _req("b", list(range(100, 108)))
    assert bm.allocate_slots(a, 8)
    before = (list(bm.ref_counts), list(bm.free))
    assert not bm.allocate_slots(b, 8)
    assert (list(bm.ref_counts), list(bm.free)) == before
    assert "b" not in bm.tables


def test_prefix_hit_shares_blocks_and_counts_refs() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = list(range(12))
    a = _req("a", shared + [50, 51])
    assert bm.allocate_slots(a, a.num_tokens)
    b = _req("b", shared + [60])
    hits, n = bm.get_computed_blocks(b)
    assert n == 12 and hits == bm.block_table("a")[:3]
    assert bm.allocate_slots(b, b.num_tokens - n, hits)
    for blk in hits:
        assert bm.ref_counts[blk] == 2
    assert bm.stats.hit_tokens == 12
    bm.check_invariants()
    bm.free_request(a)
    for blk in hits:
        assert bm.ref_counts[blk] == 1
    bm.free_request(b)
    assert bm.num_free_blocks == 16
    # Freed but still cached: a third request hits them without anyone holding them.
    c = _req("c", shared + [70, 71, 72])
    hits2, n2 = bm.get_computed_blocks(c)
    assert hits2 == hits and n2 == 12
    assert bm.allocate_slots(c, c.num_tokens - n2, hits2)
    bm.check_invariants()


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(8)))
    assert bm.allocate_slots(a, 8)
    bm.free_request(a)
    b = _req("b", list(range(8)))
    hits, n = bm.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1  # the last block holds the token whose logits we need


def test_lru_eviction_of_unused_cached_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _req("a", [1, 2, 3, 4]), _req("b", [5, 6, 7, 8])
    assert bm.allocate_slots(a, 4) and bm.allocate_slots(b, 4)
    bm.free_request(a)  # a's blocks are freed first: least recently used
    bm.free_request(b)
    c = _req("c", [9, 10, 11])  # needs 2 fresh blocks: evicts a's, keeps b's
    assert bm.allocate_slots(c, 3)
    assert bm.get_computed_blocks(_req("x", [1, 2, 3, 4, 0]))[1] == 0
    assert bm.get_computed_blocks(_req("y", [5, 6, 7, 8, 0]))[1] == 4
    bm.check_invariants()


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = _req("a", list(range(9)))
    assert bm.allocate_slots(a, 9)
    assert bm.get_computed_blocks(_req("b", list(range(9)))) == ([], 0)
    assert bm.cached == {}


def test_no_leak_after_random_traffic() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[Request] = []
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
    for i in range(1000):
        if live and rng.random() < 0.5:
            bm.free_request(live.pop(rng.randrange(len(live))))
            continue
        toks = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 10))]
        r = _req(f"r{i}", toks)
        hits, n = bm.get_computed_blocks(r)
        if bm.allocate_slots(r, r.num_tokens - n, hits):
            r.num_computed_tokens = r.num_tokens
            live.append(r)
    for r in live:
        bm.free_request(r)
    bm.check_invariants()
    assert bm.num_free_blocks == 64 and all(c == 0 for c in bm.ref_counts)
    assert bm.stats.hit_tokens > 0
