"""Incremental detokenisation never emits broken UTF-8 and adds up to the full decode."""

from __future__ import annotations

import pytest

from llmopt.loading.loader import load_model
from llmopt.loading.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(default_model_dir: str):
    return load_model(default_model_dir, device="cpu", progress=False).tokenizer


@pytest.mark.parametrize("text", [
    "plain ascii text, with spaces  and\nnewlines",
    "emoji 😀🎉👩‍👩‍👧 and CJK 漢字かな and accents: naïve café Ærø",
    "mixed 12345 numbers, tabs\tand symbols ∑∫√ ≠ ≤",
])
def test_stream_deltas_add_up(tok, text: str) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Prefix:"))
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_split_multibyte_character_is_held_back(tok) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # byte-level BPE splits this emoji over several tokens
    detok = IncrementalDetokenizer(tok)
    first = [detok.add(i) for i in ids[:-1]]
    assert "".join(first) == ""
    assert detok.add(ids[-1]) == "😀"
